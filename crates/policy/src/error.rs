//! The error type of this crate.

/// Why a policy file was rejected.
///
/// Every variant names the file (the display name the caller passed), the 1-based line and,
/// where one can be told, the field as a dotted path (`schedule.every_hours`). The `Display`
/// form is `file:line: field: what is wrong and what is allowed`, ready to print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The text is not valid TOML (unclosed string, missing `=`, duplicate key, ...).
    #[error("{file}:{line}: malformed TOML: {message}")]
    Syntax {
        /// The file's display name.
        file: String,
        /// 1-based line of the problem.
        line: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// A field that a policy does not have (fields are never silently ignored).
    #[error("{file}:{line}: {field}: unknown field; allowed here: {allowed}")]
    UnknownField {
        /// The file's display name.
        file: String,
        /// 1-based line of the unknown key.
        line: usize,
        /// Dotted path of the unknown key.
        field: String,
        /// The fields allowed at that place.
        allowed: String,
    },
    /// Valid TOML of the wrong shape: a required field is missing or a value has the wrong type.
    #[error("{file}:{line}: {field}: {message}")]
    Shape {
        /// The file's display name.
        file: String,
        /// 1-based line of the problem.
        line: usize,
        /// Dotted path of the field, or `(policy)` when it cannot be told.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A field has a value outside what is allowed; the message says what is allowed.
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        /// The file's display name.
        file: String,
        /// 1-based line of the value.
        line: usize,
        /// Dotted path of the field.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The time zone is not in the IANA time zone database.
    #[error(
        "{file}:{line}: {field}: unknown time zone {zone:?}: expected an IANA name such as \
         \"Europe/Berlin\", \"America/New_York\" or \"UTC\""
    )]
    UnknownTimeZone {
        /// The file's display name.
        file: String,
        /// 1-based line of the value.
        line: usize,
        /// Dotted path of the field (`time_zone`).
        field: String,
        /// The name that was given.
        zone: String,
    },
}

impl Error {
    /// The 1-based line the error points at.
    pub fn line(&self) -> usize {
        match self {
            Error::Syntax { line, .. }
            | Error::UnknownField { line, .. }
            | Error::Shape { line, .. }
            | Error::Invalid { line, .. }
            | Error::UnknownTimeZone { line, .. } => *line,
        }
    }

    /// The dotted path of the field the error is about, if one can be told.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Syntax { .. } => None,
            Error::UnknownField { field, .. }
            | Error::Shape { field, .. }
            | Error::Invalid { field, .. }
            | Error::UnknownTimeZone { field, .. } => Some(field),
        }
    }
}

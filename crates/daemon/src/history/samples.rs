//! Measurements of the vault's size, kept in the job database so that the console's storage
//! plot and the growth per day survive daemon restarts. The HTTP front end measures the vault
//! after every job and records the measurement here.

use jiff::Timestamp;
use rusqlite::params;

use super::{History, ms, ts};
use crate::Error;

/// The table (created with the job table).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS storage_samples (
    at_ms INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    logical_bytes INTEGER NOT NULL,
    objects INTEGER NOT NULL,
    blocks INTEGER NOT NULL,
    points INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS storage_samples_at ON storage_samples (at_ms);
";

/// At most this many measurements are kept (the oldest go first): a year of one per hour.
pub const MAX_STORAGE_SAMPLES: usize = 8760;

/// One measurement of the vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSample {
    /// When it was measured.
    pub at: Timestamp,
    /// Bytes of every object in the vault.
    pub stored: u64,
    /// The summed disk sizes of the live points.
    pub logical: u64,
    /// Objects in the vault.
    pub objects: u64,
    /// Block objects among them.
    pub blocks: u64,
    /// Live points.
    pub points: u64,
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl History {
    /// Records a measurement, dropping the oldest beyond [`MAX_STORAGE_SAMPLES`].
    pub fn record_storage(&self, s: &StorageSample) -> Result<(), Error> {
        let c = self.lock();
        c.execute(
            "INSERT INTO storage_samples (at_ms, stored_bytes, logical_bytes, objects, blocks, points)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                ms(s.at),
                int(s.stored),
                int(s.logical),
                int(s.objects),
                int(s.blocks),
                int(s.points)
            ],
        )
        .map_err(|e| self.err(e))?;
        c.execute(
            "DELETE FROM storage_samples WHERE rowid NOT IN
                (SELECT rowid FROM storage_samples ORDER BY at_ms DESC LIMIT ?1)",
            params![int(MAX_STORAGE_SAMPLES as u64)],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The latest `limit` measurements, oldest first.
    pub fn storage_samples(&self, limit: usize) -> Result<Vec<StorageSample>, Error> {
        let c = self.lock();
        let mut st = c
            .prepare(
                "SELECT at_ms, stored_bytes, logical_bytes, objects, blocks, points
                 FROM storage_samples ORDER BY at_ms DESC LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![int(limit as u64)], |r| {
                let u = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(StorageSample {
                    at: ts(r.get(0)?),
                    stored: u(1)?,
                    logical: u(2)?,
                    objects: u(3)?,
                    blocks: u(4)?,
                    points: u(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        let mut out = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: &str, stored: u64) -> StorageSample {
        StorageSample {
            at: at.parse().unwrap(),
            stored,
            logical: stored.saturating_mul(3),
            objects: 7,
            blocks: 5,
            points: 2,
        }
    }

    #[test]
    fn samples_survive_reopen_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let now: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        let (h, _) = History::open(dir.path(), now).unwrap();
        assert!(h.storage_samples(10).unwrap().is_empty());
        h.record_storage(&sample("2026-11-29T10:00:00Z", 100))
            .unwrap();
        h.record_storage(&sample("2026-11-29T11:00:00Z", 250))
            .unwrap();
        h.record_storage(&sample("2026-11-29T12:00:00Z", u64::MAX))
            .unwrap();
        drop(h);
        let (h, _) = History::open(dir.path(), now).unwrap();
        let all = h.storage_samples(10).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], sample("2026-11-29T10:00:00Z", 100));
        assert_eq!(all[1].stored, 250);
        assert_eq!(all[2].stored, i64::MAX as u64);
        let last = h.storage_samples(1).unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(
            last[0].at,
            "2026-11-29T12:00:00Z".parse::<Timestamp>().unwrap()
        );
    }
}

//! Unix socket transport: plain framing, access controlled by the socket file's permissions.
//!
//! The agent runs as root and creates the socket with mode 0600, so only root can connect.
//! The socket is bound under a temporary name, restricted to 0600 and then renamed into
//! place, so it never appears at its public path with wider permissions. Put it in a
//! directory only root can write (e.g. `/run/bulwark`), so nobody can swap it.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use crate::codec::{Connection, io_error};
use crate::error::Error;
use crate::server::{Handler, ServeOptions, serve};

/// Mode of the socket file.
pub const SOCKET_MODE: u32 = 0o600;

/// The agent's Unix socket listener. Dropping it removes the socket file (if it is still
/// ours).
#[derive(Debug)]
pub struct UnixSocketListener {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
    owner_uid: u32,
}

fn file_error<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::File {
        path: path.to_owned(),
        action,
        source,
    }
}

impl UnixSocketListener {
    /// Creates the socket at `path` with mode 0600, replacing a stale socket left by a previous
    /// run. Refuses to replace anything that is not a socket. Must be called inside a Tokio
    /// runtime.
    pub fn bind(path: &Path) -> Result<UnixSocketListener, Error> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(Error::File {
                    path: path.to_owned(),
                    action: "creating the agent socket",
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a file that is not a socket exists at this path",
                    ),
                });
            }
            _ => {}
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        // A leftover from a crashed bind of this very pid: ours to remove.
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(file_error(&tmp, "binding"))?;
        let finish = || -> Result<((u64, u64), u32), Error> {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
                .map_err(file_error(&tmp, "setting mode 0600"))?;
            std::fs::rename(&tmp, path).map_err(file_error(path, "renaming into place"))?;
            let meta = std::fs::symlink_metadata(path).map_err(file_error(path, "stat"))?;
            Ok(((meta.dev(), meta.ino()), meta.uid()))
        };
        match finish() {
            Ok((inode, owner_uid)) => Ok(UnixSocketListener {
                listener,
                path: path.to_owned(),
                inode,
                owner_uid,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection. The peer label is `unix:<path> uid=<uid> pid=<pid>`.
    ///
    /// Defence in depth on top of the file mode: a peer whose uid (from `SO_PEERCRED`) is
    /// neither root nor the socket's owner, or whose credentials cannot be read, is dropped
    /// (and logged) without a reply, and the next connection is awaited.
    pub async fn accept(&self) -> Result<Connection<UnixStream>, Error> {
        loop {
            let (stream, _) = self
                .listener
                .accept()
                .await
                .map_err(|source| io_error(&self.label(), "accepting", source))?;
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 || cred.uid() == self.owner_uid => {
                    let peer = match cred.pid() {
                        Some(pid) => format!("{} uid={} pid={pid}", self.label(), cred.uid()),
                        None => format!("{} uid={}", self.label(), cred.uid()),
                    };
                    return Ok(Connection::new(stream, peer));
                }
                Ok(cred) => tracing::warn!(
                    socket = %self.path.display(),
                    uid = cred.uid(),
                    pid = ?cred.pid(),
                    "refused a peer that is neither root nor the socket owner"
                ),
                Err(e) => tracing::warn!(
                    socket = %self.path.display(),
                    error = %e,
                    "refused a peer whose credentials cannot be read"
                ),
            }
        }
    }

    fn label(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// Serves forever, one task per connection, like
    /// [`TlsListener::run`](crate::TlsListener::run).
    pub async fn run<F, H>(&self, options: ServeOptions, mut make_handler: F)
    where
        F: FnMut(&str) -> H,
        H: Handler + 'static,
    {
        loop {
            let conn = match self.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = make_handler(conn.peer());
            tokio::spawn(async move {
                if let Err(e) = serve(conn, handler, options).await {
                    tracing::warn!(error = ?e, "connection ended with an error");
                }
            });
        }
    }
}

impl Drop for UnixSocketListener {
    fn drop(&mut self) {
        // Remove the socket only if it is still the one we created (a newer agent may have
        // replaced it).
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Connects to the agent's Unix socket.
pub async fn connect_unix(path: &Path) -> Result<Connection<UnixStream>, Error> {
    let peer = format!("unix:{}", path.display());
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| io_error(&peer, "connecting", source))?;
    Ok(Connection::new(stream, peer))
}

//! Bounded reads: no vault object is downloaded before its size is checked against the limit
//! of its format.
//!
//! Every object the vault reads has a largest size a Bulwark writer can produce:
//!
//! | object | limit (stored bytes) |
//! |---|---|
//! | block | [`MAX_BLOCK_SIZE`](bulwark_blockdiff::MAX_BLOCK_SIZE) + envelope header + encryption overhead |
//! | manifest | the block map of the disk the point records (entries × 49 + 64), else 1 GiB of block map (a 20 TiB disk at 1 MiB blocks), plus the envelope |
//! | point | 16 MiB + the envelope |
//! | tombstone (`deleted/`) | twice a point, hex-encoded, + 64 KiB |
//! | configuration, lease | 64 KiB ([`MAX_CONFIG_BYTES`], [`MAX_LEASE_BYTES`]) |
//!
//! `get_capped` reads the size the store reports for the object (`Content-Length` of the
//! GET, or the file's length) and refuses an object over the limit before reading any of its
//! content; the read itself is capped too, so a store that reports one length and sends more
//! is cut off at the limit. A refused object is an error naming the key, its size and the
//! limit, never an allocation of whatever size the object claims.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt};

use crate::Error;
use crate::retry::{RetryPolicy, retry};

/// The largest vault configuration object read (`bulwark-vault.json`): a few hundred bytes
/// are written.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// The largest lease object read (`locks/…`): a few hundred bytes are written.
pub const MAX_LEASE_BYTES: u64 = 64 * 1024;

/// What a capped read found.
pub(crate) enum Capped {
    /// The whole object, within the limit.
    Read(Bytes),
    /// The object is larger than the limit: its size (as reported, or as far as it was read).
    TooLarge(u64),
}

/// Reads `key` whole if it is at most `limit` bytes; transient failures are retried with
/// `policy`. Store errors (including `NotFound`) are returned as they are.
pub(crate) async fn get_capped(
    store: &dyn ObjectStore,
    policy: &RetryPolicy,
    key: &ObjPath,
    limit: u64,
) -> Result<Capped, object_store::Error> {
    retry(policy, key.as_ref(), |_| read_once(store, key, limit)).await
}

async fn read_once(
    store: &dyn ObjectStore,
    key: &ObjPath,
    limit: u64,
) -> Result<Capped, object_store::Error> {
    let r = store.get(key).await?;
    let len = r.range.end.saturating_sub(r.range.start);
    if len > limit || r.meta.size > limit {
        return Ok(Capped::TooLarge(len.max(r.meta.size)));
    }
    if matches!(r.payload, GetResultPayload::File(..)) {
        // A local file: `bytes` reads exactly the range, whose length was checked.
        return Ok(Capped::Read(r.bytes().await?));
    }
    // `len <= limit`, so this allocation is bounded.
    let mut buf = BytesMut::with_capacity(len as usize);
    let mut stream = r.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let total = buf.len() as u64 + chunk.len() as u64;
        if total > limit {
            return Ok(Capped::TooLarge(total));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Capped::Read(buf.freeze()))
}

/// The error for an object over its limit: a Bulwark writer never produces one, so it is
/// damage or tampering, and it names the key, the size and the limit.
pub(crate) fn too_large(key: &str, what: &str, size: u64, limit: u64) -> Error {
    Error::Corrupt {
        key: key.to_string(),
        why: format!(
            "object is {size} bytes, more than the {limit}-byte limit of a {what}; not read \
             (a Bulwark {what} is never that large: damaged or planted?)"
        ),
    }
}

/// Reads `key` as an object of `what` with at most `limit` bytes: a missing object is
/// [`Error::Missing`], an oversized one [`Error::Corrupt`] naming its size and the limit.
pub(crate) async fn read_bounded(
    store: &dyn ObjectStore,
    policy: &RetryPolicy,
    key: &ObjPath,
    what: &str,
    limit: u64,
) -> Result<Bytes, Error> {
    match get_capped(store, policy, key, limit).await {
        Ok(Capped::Read(b)) => Ok(b),
        Ok(Capped::TooLarge(size)) => Err(too_large(key.as_ref(), what, size, limit)),
        Err(e) => Err(Error::store(key, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn reads_within_and_refuses_over_the_limit() {
        let store = InMemory::new();
        let key = ObjPath::from("k");
        store
            .put(&key, PutPayload::from(vec![1u8; 1000]))
            .await
            .unwrap();
        let p = RetryPolicy::default();
        let b = read_bounded(&store, &p, &key, "thing", 1000).await.unwrap();
        assert_eq!(b.len(), 1000);
        let e = read_bounded(&store, &p, &key, "thing", 999)
            .await
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("k: corrupt: object is 1000 bytes"), "{s}");
        assert!(s.contains("999-byte limit of a thing"), "{s}");
        let missing = ObjPath::from("nope");
        assert!(matches!(
            read_bounded(&store, &p, &missing, "thing", 10).await,
            Err(Error::Missing { .. })
        ));
    }

    #[tokio::test]
    async fn local_file_over_the_limit_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        // A sparse 8 GiB file: reading it whole would exhaust memory.
        let f = std::fs::File::create(dir.path().join("big")).unwrap();
        f.set_len(8 << 30).unwrap();
        let e = read_bounded(
            &store,
            &RetryPolicy::default(),
            &ObjPath::from("big"),
            "lease",
            MAX_LEASE_BYTES,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("object is 8589934592 bytes"), "{e}");
    }
}

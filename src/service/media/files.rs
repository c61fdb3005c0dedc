//! The media files on disk: each stored once, named by the SHA-256 of its bytes, under
//! `media.path` (`ab/cd/abcd…`: two levels of 256 folders). A file is written to
//! `media.path/tmp/` first, hashed as it streams in, synced, then renamed into place:
//! a reader never sees half a file. It knows nothing of media items or the database.

use std::{
    io,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

/// The content store under `media.path`.
pub struct MediaFiles {
    root: PathBuf,
}

/// A file written to the temporary folder, not yet in place. Dropped unplaced, it is
/// removed.
pub struct Staged {
    temp: PathBuf,
    pub hash: String,
    pub size: u64,
    placed: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Whether `hash` is a content hash (64 lowercase hex digits): nothing else becomes a path.
fn is_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::internal(format!("media store: cannot {what} {}: {e}", path.display()))
}

impl MediaFiles {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the file of `hash` lives.
    fn path_of(&self, hash: &str) -> Result<PathBuf> {
        if !is_hash(hash) {
            return Err(Error::internal(format!("media store: {hash:?} is not a content hash")));
        }
        Ok(self.root.join(&hash[0..2]).join(&hash[2..4]).join(hash))
    }

    async fn temp_path(&self) -> Result<PathBuf> {
        let dir = self.root.join("tmp");
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io_error("create", &dir, e))?;
        Ok(dir.join(crate::service::ids::generate_session_id()))
    }

    /// Writes `body` to a temporary file, hashing it, and stops reading as soon as it
    /// passes `limit` bytes (`413 M_TOO_LARGE`). Errors of the body stream are passed on.
    pub async fn stage<S>(&self, mut body: S, limit: u64) -> Result<Staged>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let temp = self.temp_path().await?;
        let mut staged = Staged { temp: temp.clone(), hash: String::new(), size: 0, placed: false };
        let mut file = tokio::fs::File::create(&temp).await.map_err(|e| io_error("create", &temp, e))?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            staged.size += chunk.len() as u64;
            if staged.size > limit {
                return Err(Error::too_large(format!("Uploads are {limit} bytes at most")));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| io_error("write", &temp, e))?;
        }
        file.sync_all().await.map_err(|e| io_error("sync", &temp, e))?;
        staged.hash = hex(&hasher.finalize());
        Ok(staged)
    }

    /// `stage` for bytes already in memory (thumbnails, remote media).
    pub async fn stage_bytes(&self, bytes: Vec<u8>) -> Result<Staged> {
        let size = bytes.len() as u64;
        self.stage(futures_util::stream::iter([Ok(Bytes::from(bytes))]), size).await
    }

    /// Moves a staged file into place under its hash. If a file with that hash is
    /// there already, it has the same bytes: the staged copy is dropped.
    pub async fn place(&self, mut staged: Staged) -> Result<()> {
        let path = self.path_of(&staged.hash)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(|e| io_error("create", dir, e))?;
        }
        tokio::fs::rename(&staged.temp, &path).await.map_err(|e| io_error("rename into", &path, e))?;
        staged.placed = true;
        Ok(())
    }

    /// Opens the file of `hash`; `None` if there is none.
    pub async fn open(&self, hash: &str) -> Result<Option<tokio::fs::File>> {
        let path = self.path_of(hash)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("open", &path, e)),
        }
    }

    /// The path of `hash`'s file, for decoding it off the async threads.
    pub fn file_path(&self, hash: &str) -> Result<PathBuf> {
        self.path_of(hash)
    }

    /// Removes the file of `hash` (nothing if it is gone already).
    pub async fn remove(&self, hash: &str) -> Result<()> {
        let path = self.path_of(hash)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_are_named_by_hash_and_limits_stop_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let files = MediaFiles::new(dir.path().to_owned());
        let staged = files.stage_bytes(b"hello".to_vec()).await.unwrap();
        let hash = staged.hash.clone();
        assert_eq!(hash, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        files.place(staged).await.unwrap();
        assert!(dir.path().join("2c/f2").join(&hash).exists());
        // The same bytes again: one file, no temporary left behind.
        files.place(files.stage_bytes(b"hello".to_vec()).await.unwrap()).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        // A stream that goes on past the limit is cut: its temporary file is removed.
        let endless = futures_util::stream::repeat_with(|| Ok(Bytes::from_static(&[0u8; 1000]))).take(1_000_000);
        let err = files.stage(Box::pin(endless), 10_000).await.err().unwrap();
        assert_eq!(err.errcode(), "M_TOO_LARGE");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        assert!(files.open("../../etc/passwd").await.is_err());
        files.remove(&hash).await.unwrap();
        assert!(files.open(&hash).await.unwrap().is_none());
    }
}

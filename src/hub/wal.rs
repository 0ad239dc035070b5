//! The embedded hub's write-ahead log: what makes a group commit durable
//! with one small write and one `fdatasync` (issue 4: an API call answers
//! only once what it reports is on disk, and a command's round trip
//! should stay under 2 ms at p99).
//!
//! Why not a durable redb commit per group commit: redb writes every page
//! its B-trees touched (about ten scattered writes per commit) and then
//! flushes; on this machine that is ~0.8 ms per command and most of the
//! tail (perf/RESULTS.md, "write-ahead log"). Appending one frame to a
//! file whose blocks already exist and `fdatasync`ing it needs no
//! file-system journal commit: one data write and one cache flush.
//!
//! The store ([`super::store`]) appends a frame per group commit, then
//! applies the same rows to redb with `Durability::None`; every few
//! seconds, or when the log is full, it makes one durable redb commit (a
//! checkpoint) that also records a new *generation* in redb, and the log
//! starts again at offset 0. On open, the frames of the generation redb
//! records are replayed: they are exactly the group commits after the
//! last checkpoint.
//!
//! A frame on disk: `len: u32 LE`, `crc: u32 LE` (CRC-32 of the next
//! eight bytes and the payload), `gen: u64 LE`, then `len` bytes of
//! payload. Reading stops at the first frame that is not whole, not of
//! the generation, or fails its checksum: a torn last frame was never
//! acknowledged, and anything after it is from an older generation.
//!
//! The file grows in chunks written with zeros and synced once, so that
//! the appends that follow overwrite allocated, initialised blocks (an
//! `fallocate`d range is "unwritten" on ext4 and its first write would
//! need a journal commit again).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes before a frame's payload.
pub(crate) const HEADER: u64 = 16;
/// The first chunk the file grows by; later ones double its size.
const FIRST_CHUNK: u64 = 1 << 20;
/// Zeros written per call while growing.
const ZEROS: usize = 64 * 1024;

/// The log file, positioned after the last frame of its generation.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next frame goes.
    head: u64,
    /// Bytes of the file that are allocated and initialised.
    size: u64,
    /// The generation new frames carry.
    gen: u64,
    /// The file never grows past this; [`Wal::fits`] says when a frame
    /// would not fit (the store then checkpoints instead).
    limit: u64,
}

impl Wal {
    /// Opens (or creates) the log at `path`, and returns it with the
    /// payloads of the frames of generation `gen`, oldest first. The
    /// caller replays them, then calls [`Wal::reset`] with a new
    /// generation before appending.
    pub(crate) fn open(path: &Path, gen: u64, limit: u64) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if created {
            // The file's name must survive a crash too.
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let size = file.metadata()?.len();
        let mut bytes = vec![0; usize::try_from(size).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut bytes, 0)?;
        let frames = frames_of(&bytes, gen);
        let head = frames.iter().map(|f| HEADER + f.len() as u64).sum::<u64>();
        Ok((
            Wal {
                file,
                path: path.to_owned(),
                head,
                size,
                gen,
                limit: limit.max(FIRST_CHUNK),
            },
            frames,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a frame of `len` payload bytes fits before the limit.
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.head + HEADER + len as u64 <= self.limit
    }

    /// Bytes of frames of the current generation.
    pub(crate) fn used(&self) -> u64 {
        self.head
    }

    /// Appends one frame and waits until it is on disk. The caller checks
    /// [`Wal::fits`] first.
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|_| self.fits(payload.len()))
            .ok_or_else(|| io::Error::other("a frame larger than the log"))?;
        let end = self.head + HEADER + u64::from(len);
        if end > self.size {
            self.grow(end)?;
        }
        let mut frame = Vec::with_capacity(HEADER as usize + payload.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc(self.gen, payload).to_le_bytes());
        frame.extend_from_slice(&self.gen.to_le_bytes());
        frame.extend_from_slice(payload);
        self.file.write_all_at(&frame, self.head)?;
        self.file.sync_data()?;
        self.head = end;
        Ok(())
    }

    /// Starts the log again at offset 0 with generation `gen`, after a
    /// checkpoint recorded `gen` durably: the frames left in the file are
    /// of an older generation and are never read again.
    pub(crate) fn reset(&mut self, gen: u64) {
        self.gen = gen;
        self.head = 0;
    }

    /// Writes zeros up to at least `end` (doubling, within the limit) and
    /// syncs the new size once.
    fn grow(&mut self, end: u64) -> io::Result<()> {
        let target = end
            .max(self.size.saturating_mul(2))
            .max(FIRST_CHUNK)
            .min(self.limit)
            .max(end);
        let zeros = vec![0u8; ZEROS];
        let mut at = self.size;
        while at < target {
            let n = (target - at).min(ZEROS as u64);
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        self.file.sync_all()?;
        self.size = target;
        Ok(())
    }
}

fn crc(gen: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&gen.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The payloads of the whole frames of `gen` from the start of `bytes`.
fn frames_of(bytes: &[u8], gen: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let header = HEADER as usize;
    while let Some(h) = bytes.get(at..at + header) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let sum = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let frame_gen = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        if len == 0 || frame_gen != gen {
            break;
        }
        let Some(payload) = bytes.get(at + header..at + header + len) else {
            break;
        };
        if crc(gen, payload) != sum {
            break;
        }
        out.push(payload.to_vec());
        at += header + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, gen: u64) -> (Wal, Vec<Vec<u8>>) {
        Wal::open(&dir.join("hub.wal"), gen, 4 << 20).unwrap()
    }

    #[test]
    fn frames_of_the_generation_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, frames) = open(dir.path(), 1);
        assert!(frames.is_empty());
        for i in 0..100u32 {
            wal.append(&vec![i as u8; 10 + i as usize]).unwrap();
        }
        drop(wal);
        let (wal, frames) = open(dir.path(), 1);
        assert_eq!(frames.len(), 100);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f, &vec![i as u8; 10 + i]);
        }
        assert_eq!(wal.used(), (0..100).map(|i| HEADER + 10 + i).sum::<u64>());
    }

    #[test]
    fn older_generations_after_a_reset_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        for _ in 0..10 {
            wal.append(&[1; 100]).unwrap();
        }
        wal.reset(2);
        wal.append(&[2; 50]).unwrap();
        drop(wal);
        // Generation 2 has one frame; the rest of the file is generation
        // 1's, stale.
        let (_, frames) = open(dir.path(), 2);
        assert_eq!(frames, vec![vec![2; 50]]);
        // After a checkpoint that recorded generation 3, nothing.
        let (_, frames) = open(dir.path(), 3);
        assert!(frames.is_empty());
    }

    #[test]
    fn a_torn_or_corrupt_frame_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.wal");
        let (mut wal, _) = open(dir.path(), 7);
        for i in 0..3u8 {
            wal.append(&[i; 100]).unwrap();
        }
        drop(wal);
        // One byte of the second frame's payload flipped: only the first
        // frame is read.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], HEADER + 100 + HEADER + 5)
            .unwrap();
        let (_, frames) = open(dir.path(), 7);
        assert_eq!(frames, vec![vec![0; 100]]);
        // A length running past the end of the file.
        file.write_all_at(&u32::MAX.to_le_bytes(), 0).unwrap();
        let (_, frames) = open(dir.path(), 7);
        assert!(frames.is_empty());
    }

    #[test]
    fn the_file_grows_with_written_blocks_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        let path = dir.path().join("hub.wal");
        wal.append(&[1; 10]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), FIRST_CHUNK);
        let big = vec![3u8; (FIRST_CHUNK as usize) + 1];
        wal.append(&big).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * FIRST_CHUNK);
        // 4 MiB limit: a frame past it is refused, and `fits` says so.
        let huge = vec![0u8; 3 << 20];
        assert!(!wal.fits(huge.len()));
        assert!(wal.append(&huge).is_err());
        assert!(std::fs::metadata(&path).unwrap().len() <= 4 << 20);
    }
}

//! TensorBoard event files, so `tensorboard --logdir runs` shows every run's curves.
//!
//! The format is TFRecord framing (length, masked CRC-32C of the length, payload, masked CRC-32C
//! of the payload) around `tensorflow.Event` protobuf messages. Only four fields of three messages
//! are needed (Event.wall_time/step/file_version/summary, Summary.value, Value.tag/simple_value),
//! so they are encoded here by hand rather than pulling in a protobuf toolchain; the CRC comes
//! from the `crc32c` crate. Readers check both CRCs, so a torn last record (a crash mid-write) is
//! dropped by TensorBoard rather than corrupting the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::callbacks::{Callback, EvalRecord, StepRecord};
use crate::{io_err, Result};

/// Writes `events.out.tfevents.<time>.kindling` in the run folder.
pub struct TensorBoard {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` with its wall time, step and either a file version or scalar summary values.
fn event(step: u64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64: wall_time
    e.extend_from_slice(&now().to_le_bytes());
    e.push(0x10); // field 2, varint: step
    varint(step, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v);
            v.push(0x15); // field 2, fixed32: simple_value
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

impl TensorBoard {
    pub fn create(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
        let path = run_dir.join(format!("events.out.tfevents.{}.kindling", now() as u64));
        let file = std::fs::File::create(&path).map_err(io_err(&path))?;
        let mut tb = TensorBoard {
            path,
            file: std::io::BufWriter::new(file),
        };
        tb.record(&event(0, Some("brain.Event:2"), &[]))?;
        Ok(tb)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut r = Vec::with_capacity(data.len() + 16);
        r.extend_from_slice(&len);
        r.extend_from_slice(&masked_crc(&len).to_le_bytes());
        r.extend_from_slice(data);
        r.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&r).map_err(io_err(&self.path))
    }

    fn scalars(&mut self, step: u64, values: Vec<(String, f32)>) -> Result<()> {
        self.record(&event(step, None, &values))
    }
}

impl Callback for TensorBoard {
    fn on_step_end(&mut self, r: &StepRecord) -> Result<()> {
        let mut v = vec![
            ("train/loss".to_string(), r.loss as f32),
            ("train/lr".into(), r.lr as f32),
            ("train/grad_norm".into(), r.grad_norm as f32),
            (
                "train/units_per_s".into(),
                (r.units as f64 / r.step_secs.max(1e-9)) as f32,
            ),
        ];
        if let Some(g) = r.gflops_per_s {
            v.push(("train/gflops_per_s".into(), g as f32));
        }
        v.extend(
            r.metrics
                .iter()
                .map(|(k, m)| (format!("train/{k}"), *m as f32)),
        );
        self.scalars(r.step, v)
    }

    fn on_eval_end(&mut self, r: &EvalRecord) -> Result<()> {
        let v = r
            .metrics
            .iter()
            .map(|(k, m)| (format!("eval/{k}"), *m as f32))
            .collect();
        self.scalars(r.step, v)?;
        // Evals are rare: make them visible to a live TensorBoard at once.
        self.file.flush().map_err(io_err(&self.path))
    }

    fn on_train_end(&mut self) -> Result<()> {
        self.file.flush().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_lengths_and_checked_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::create(dir.path()).unwrap();
        tb.scalars(7, vec![("train/loss".into(), 1.5)]).unwrap();
        tb.on_train_end().unwrap();
        let bytes = std::fs::read(&tb.path).unwrap();
        let mut at = 0;
        let mut payloads = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            payloads.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(payloads.len(), 2);
        let text = String::from_utf8_lossy(&payloads[0]);
        assert!(text.contains("brain.Event:2"));
        let scalar = &payloads[1];
        assert!(scalar.windows(10).any(|w| w == b"train/loss"));
        assert!(scalar.windows(4).any(|w| w == 1.5f32.to_le_bytes()));
        // The step field: tag 0x10 then varint 7.
        assert!(scalar.windows(2).any(|w| w == [0x10, 7]));
    }

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}

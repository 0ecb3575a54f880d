//! Reads an ONNX model file with its large weights left on disk.
//!
//! tract's own reader maps the whole file, decodes every weight into the
//! protobuf and then copies each one again into a tensor: for a while the
//! process holds the weights twice (1.8 GB for the 885 MB fp32 encoder). Here
//! the file is read as a stream and each initializer whose `raw_data` has at
//! least [`EXTERNAL_MIN_BYTES`] is rewritten as ONNX external data that points
//! back into the same file (`location`, `offset`, `length`). The engine reads
//! those weights itself, each into its tensor ([`super::weights`]); tract's
//! reader would read them one tensor at a time. What gets decoded is the graph
//! and the small tensors, a few hundred kilobytes.
//!
//! Only the protobuf wire format is needed. A message is a run of (key, value)
//! fields, and any field can be copied as it stands. Three fields are walked on
//! the way to the weights (`ModelProto.graph`, `GraphProto.initializer`,
//! `TensorProto.raw_data`), and the two messages that enclose a rewritten
//! tensor are written out again with their new lengths.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

/// Initializers with at least this many bytes of `raw_data` stay in the file
/// and are read from it each into its tensor ([`super::weights`]). Smaller
/// ones (norms, biases, scales, zero points) are decoded with the graph.
pub const EXTERNAL_MIN_BYTES: u64 = 16 * 1024;

// Field numbers from onnx.proto.
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;
const TENSOR_EXTERNAL_DATA: u32 = 13;
const TENSOR_DATA_LOCATION: u32 = 14;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
/// `TensorProto.DataLocation.EXTERNAL`.
const DATA_LOCATION_EXTERNAL: u64 = 1;

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A model's protobuf bytes with its large weights left in the file.
#[derive(Debug)]
pub struct LeanModel {
    /// The rewritten `ModelProto`, ready for tract's decoder.
    pub bytes: Vec<u8>,
    /// The directory tract must parse it in: the file's own, symlinks resolved
    /// (tract refuses external data that resolves outside it, and a model
    /// directory of links, like a Hugging Face snapshot, points elsewhere).
    pub dir: std::path::PathBuf,
    /// The file's name in [`LeanModel::dir`]: the `location` of every
    /// initializer left in it.
    pub location: String,
    /// How many initializers now point into the file.
    pub external: usize,
}

/// Reads the ONNX model at `path`. Initializers with at least `min_bytes` of
/// `raw_data` become external data in the file itself, so tract must parse the
/// result with [`LeanModel::dir`] as the model directory.
pub fn read(path: &Path, min_bytes: u64) -> io::Result<LeanModel> {
    let path = path.canonicalize()?;
    let unusable = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    let dir = path
        .parent()
        .ok_or_else(|| unusable("the model file has no directory"))?
        .to_path_buf();
    let location = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| unusable("the model file name is not UTF-8"))?
        .to_string();
    let file = File::open(&path)?;
    let end = file.metadata()?.len();
    let mut walk = Walk {
        src: Source {
            inner: BufReader::with_capacity(1 << 16, file),
            pos: 0,
        },
        location: location.clone(),
        min_bytes,
        external: 0,
    };
    let mut bytes = Vec::new();
    walk.model(end, &mut bytes)?;
    Ok(LeanModel {
        bytes,
        dir,
        location,
        external: walk.external,
    })
}

fn malformed(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not an ONNX model: {why}"),
    )
}

/// A reader that knows its offset in the file.
struct Source<R> {
    inner: R,
    pos: u64,
}

impl<R: Read + Seek> Source<R> {
    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8];
        self.inner.read_exact(&mut b)?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    /// A field's key: (field number, wire type, the key as read).
    fn key(&mut self) -> io::Result<(u32, u8, u64)> {
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| malformed("field number too large"))?;
        Ok((field, (key & 7) as u8, key))
    }

    /// The length of a length-delimited value, checked against `end`.
    fn len(&mut self, end: u64) -> io::Result<u64> {
        let len = self.varint()?;
        match self.pos.checked_add(len) {
            Some(stop) if stop <= end => Ok(len),
            _ => Err(malformed("a field runs past its message")),
        }
    }

    fn copy(&mut self, n: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let copied = (&mut self.inner).take(n).read_to_end(out)?;
        if copied as u64 != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let n_signed = i64::try_from(n).map_err(|_| malformed("field too large"))?;
        self.inner.seek_relative(n_signed)?;
        self.pos += n;
        Ok(())
    }

    /// Copies one field's value (after its key) as it stands.
    fn copy_value(&mut self, wire: u8, end: u64, out: &mut Vec<u8>) -> io::Result<()> {
        match wire {
            VARINT => put_varint(out, self.varint()?),
            FIXED64 => self.copy(8, out)?,
            FIXED32 => self.copy(4, out)?,
            LEN => {
                let len = self.len(end)?;
                put_varint(out, len);
                self.copy(len, out)?;
            }
            _ => return Err(malformed("unsupported protobuf wire type")),
        }
        if self.pos > end {
            return Err(malformed("a field runs past its message"));
        }
        Ok(())
    }
}

/// One pass over the file, writing the lean model.
struct Walk<R> {
    src: Source<R>,
    location: String,
    min_bytes: u64,
    external: usize,
}

impl<R: Read + Seek> Walk<R> {
    fn model(&mut self, end: u64, out: &mut Vec<u8>) -> io::Result<()> {
        self.message(end, out, MODEL_GRAPH, Self::graph)
    }

    fn graph(&mut self, end: u64, out: &mut Vec<u8>) -> io::Result<()> {
        self.message(end, out, GRAPH_INITIALIZER, Self::tensor)
    }

    /// Copies a message's fields up to `end`, except that the length-delimited
    /// field `walked` goes through `inner` and is written with its new length.
    fn message(
        &mut self,
        end: u64,
        out: &mut Vec<u8>,
        walked: u32,
        inner: fn(&mut Self, u64, &mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        while self.src.pos < end {
            let (field, wire, key) = self.src.key()?;
            put_varint(out, key);
            if field == walked && wire == LEN {
                let len = self.src.len(end)?;
                let mut body = Vec::new();
                inner(self, self.src.pos + len, &mut body)?;
                put_bytes(out, &body);
            } else {
                self.src.copy_value(wire, end, out)?;
            }
        }
        Ok(())
    }

    fn tensor(&mut self, end: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let mut left = None;
        let mut located = false;
        while self.src.pos < end {
            let (field, wire, key) = self.src.key()?;
            if field == TENSOR_DATA_LOCATION && wire == VARINT {
                // Copied as it stands: an explicit `DEFAULT` is overridden by
                // the `EXTERNAL` written after it (the last value wins).
                let location = self.src.varint()?;
                located |= location == DATA_LOCATION_EXTERNAL;
                put_varint(out, key);
                put_varint(out, location);
            } else if field == TENSOR_RAW_DATA && wire == LEN {
                let len = self.src.len(end)?;
                if len >= self.min_bytes {
                    left = Some((self.src.pos, len));
                    self.src.skip(len)?;
                    continue;
                }
                put_varint(out, key);
                put_varint(out, len);
                self.src.copy(len, out)?;
            } else {
                located |= field == TENSOR_EXTERNAL_DATA;
                put_varint(out, key);
                self.src.copy_value(wire, end, out)?;
            }
        }
        let Some((offset, len)) = left else {
            return Ok(());
        };
        if located {
            return Err(malformed("a tensor has both raw_data and external data"));
        }
        for (k, v) in [
            ("location", self.location.clone()),
            ("offset", offset.to_string()),
            ("length", len.to_string()),
        ] {
            let mut entry = Vec::new();
            put_varint(&mut entry, field_key(ENTRY_KEY, LEN));
            put_bytes(&mut entry, k.as_bytes());
            put_varint(&mut entry, field_key(ENTRY_VALUE, LEN));
            put_bytes(&mut entry, v.as_bytes());
            put_varint(out, field_key(TENSOR_EXTERNAL_DATA, LEN));
            put_bytes(out, &entry);
        }
        put_varint(out, field_key(TENSOR_DATA_LOCATION, VARINT));
        put_varint(out, DATA_LOCATION_EXTERNAL);
        self.external += 1;
        Ok(())
    }
}

fn field_key(field: u32, wire: u8) -> u64 {
    (u64::from(field) << 3) | u64::from(wire)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{ModelProto, TensorProto};
    use tract_onnx::prelude::Framework;

    use crate::speech::tiny_model_file as tiny;

    fn decode(bytes: &[u8]) -> ModelProto {
        tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .expect("decodes")
    }

    fn external(t: &TensorProto, key: &str) -> Option<String> {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    }

    /// Every initializer left in the file points at exactly its original
    /// bytes, and nothing else in the model changed.
    fn check_against_tract(file: &str, min_bytes: u64) -> usize {
        let path = tiny(file);
        let whole = std::fs::read(&path).expect("model file");
        let lean = read(&path, min_bytes).expect("lean read");
        assert!(
            lean.bytes.len() < whole.len(),
            "nothing was left in the file"
        );
        let mut ours = decode(&lean.bytes);
        let mut theirs = decode(&whole);
        let ours_graph = ours.graph.as_mut().expect("graph");
        let theirs_graph = theirs.graph.as_mut().expect("graph");
        assert_eq!(ours_graph.initializer.len(), theirs_graph.initializer.len());
        let mut left = 0;
        for (o, t) in ours_graph
            .initializer
            .iter_mut()
            .zip(theirs_graph.initializer.iter_mut())
        {
            if t.raw_data.len() as u64 >= min_bytes {
                assert!(o.raw_data.is_empty(), "{} kept its data", o.name);
                assert_eq!(o.data_location, Some(DATA_LOCATION_EXTERNAL as i32));
                assert_eq!(external(o, "location").as_deref(), Some(file));
                let offset: usize = external(o, "offset").expect("offset").parse().expect("n");
                let length: usize = external(o, "length").expect("length").parse().expect("n");
                assert_eq!(
                    &whole[offset..offset + length],
                    &t.raw_data[..],
                    "{}",
                    o.name
                );
                o.external_data.clear();
                o.data_location = t.data_location;
                t.raw_data.clear();
                left += 1;
            }
        }
        assert_eq!(left, lean.external);
        assert!(ours == theirs, "{file}: the rest of the model differs");
        left
    }

    #[test]
    fn large_weights_point_into_the_file() {
        for file in ["v3_e2e_rnnt_encoder.onnx", "v3_e2e_rnnt_encoder_int8.onnx"] {
            assert!(check_against_tract(file, 1024) > 10, "{file}");
            // The threshold the engine uses finds weights in the tiny model too,
            // so the tuned-vs-plain encoder tests in `tune` load through here.
            assert!(check_against_tract(file, EXTERNAL_MIN_BYTES) > 0, "{file}");
        }
    }

    /// A model directory of symlinks into another directory (a Hugging Face
    /// snapshot, a shared model store) loads: tract refuses external data
    /// outside the model directory, so the weights must be located from the
    /// file the link resolves to.
    #[cfg(unix)]
    #[test]
    fn a_model_reached_through_a_symlink_loads() {
        let dir = std::env::temp_dir().join(format!("gigastt-lean-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let link = dir.join("v3_e2e_rnnt_encoder.onnx");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(tiny("v3_e2e_rnnt_encoder.onnx"), &link).expect("symlink");
        let loaded = crate::speech::model::load_encoder(&link, ("audio_signal", "length"), None);
        let _ = std::fs::remove_dir_all(&dir);
        let (_, build) = loaded.expect("loads through the link");
        assert!(build.rewrites.weights_from_file > 0);
    }

    #[test]
    fn a_truncated_or_foreign_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("gigastt-lean-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let whole = std::fs::read(tiny("v3_e2e_rnnt_encoder.onnx")).expect("model file");
        for (name, bytes) in [
            ("cut.onnx", &whole[..whole.len() / 2]),
            ("cut-early.onnx", &whole[..40]),
            (
                "wav.onnx",
                &b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00"[..],
            ),
            ("varint.onnx", &[0xffu8; 16][..]),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).expect("write");
            let error = read(&path, 1024).expect_err(name);
            assert!(
                matches!(
                    error.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{name}: {error}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

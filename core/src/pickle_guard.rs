//! The allow-list for PyTorch checkpoints: before a `.bin`/`.pt` file is parsed, every
//! Python global its pickles name is checked against the few that rebuild tensors. A real
//! unpickler imports (and so may run) whatever a `GLOBAL` names; vlsm never runs anything,
//! but a checkpoint naming `os.system` is hostile or broken either way and is refused by
//! name rather than half-read.
//!
//! The scan walks the opcode stream as Python's `pickletools.genops` does, for protocols
//! 0–5 (`FRAME` included), without building any object.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

use crate::error::{Error, Result};

/// Globals that rebuild tensors and state dicts, the only ones a weight file needs.
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch._tensor", "Tensor"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("torch", "UntypedStorage"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
];

/// `torch.<dtype>` names (`_rebuild_tensor_v3` and typed storages carry one).
const DTYPES: &[&str] = &[
    "float32",
    "float",
    "float16",
    "half",
    "bfloat16",
    "float64",
    "double",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "short",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
];

/// Training checkpoints (Lightning's `best.ckpt`) also pickle the run's loss, optimizer and
/// scheduler objects beside the `state_dict`. vlsm reads `state_dict` only and never builds
/// these, so the classes below may be named; they are plain classes whose construction
/// takes data, never a callable, and anything not listed (`os.system`, `builtins.eval`,
/// `subprocess.*`, …) is still refused. `functools.partial` is harmless here because every
/// callable it could wrap must itself pass this list.
fn is_training_extra(module: &str, name: &str) -> bool {
    let class_name = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    matches!(
        (module, name),
        ("functools", "partial")
            | (
                "builtins" | "__builtin__",
                "set" | "frozenset" | "slice" | "complex"
            )
            | ("collections", "defaultdict" | "deque")
            | ("torch", "device" | "dtype")
            | (
                "numpy.core.multiarray" | "numpy._core.multiarray",
                "scalar" | "_reconstruct"
            )
            | ("numpy", "dtype" | "ndarray")
    ) || (class_name
        && (module.starts_with("monai.losses")
            || module.starts_with("monai.utils")
            || module == "torch.nn.modules.loss"
            || module.starts_with("torch.optim")
            || module == "pytorch_lightning.utilities.parsing"
            || module == "lightning.pytorch.utilities.parsing"
            || module == "lightning_fabric.utilities.data"
            || module.starts_with("omegaconf")))
}

fn is_allowed(module: &str, name: &str) -> bool {
    ALLOWED.contains(&(module, name))
        || is_training_extra(module, name)
        || (module == "torch"
            && (DTYPES.contains(&name)
                || (name.ends_with("Storage")
                    && name.len() > "Storage".len()
                    && name.chars().all(|c| c.is_ascii_alphanumeric()))))
}

/// The largest pickle scanned (a state dict's pickle is a few MB even for large models).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Checks every global the checkpoint at `path` names; the error names the first refused.
pub fn check_checkpoint(path: &Path) -> Result<()> {
    let source = path.display().to_string();
    let refuse = |why: String| Error::Weights(format!("{source}: {why}"));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = Vec::new();
    (&file)
        .take(262)
        .read_to_end(&mut head)
        .and_then(|_| file.rewind())
        .map_err(|e| Error::io(path, e))?;
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        let mut archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| refuse(format!("not a readable PyTorch checkpoint ({e})")))?;
        // `torch.save` writes `<root>/data.pkl`; other `.pkl` entries would be read too.
        let names: Vec<String> = archive
            .file_names()
            .collect::<zip::result::ZipResult<Vec<_>>>()
            .map_err(|e| refuse(format!("not a readable PyTorch checkpoint ({e})")))?
            .into_iter()
            .filter(|n| n.ends_with(".pkl"))
            .map(|n| n.into_owned())
            .collect();
        if names.is_empty() {
            return Err(refuse(
                "not a PyTorch checkpoint: the ZIP archive has no data.pkl".into(),
            ));
        }
        for name in names {
            let entry = archive
                .by_name(&name)
                .map_err(|e| refuse(format!("{name}: {e}")))?;
            scan(&mut BufReader::new(entry)).map_err(|e| refuse(format!("{name}: {e}")))?;
        }
        return Ok(());
    }
    if head.get(257..262) == Some(b"ustar") {
        return Err(refuse(
            "the pre-1.0 TAR checkpoint format is not supported (re-save it with torch.save)"
                .into(),
        ));
    }
    // A legacy (PyTorch < 1.6) file is five pickles (magic, protocol, system info, the
    // object, the storage keys) and then raw storages; a bare pickle is one.
    let mut r = BufReader::new(file);
    for _ in 0..if is_legacy(&head) { 5 } else { 1 } {
        scan(&mut r).map_err(&refuse)?;
    }
    Ok(())
}

/// Whether a file opens with the legacy magic number (as `LONG1` bytes or `LONG` text).
fn is_legacy(head: &[u8]) -> bool {
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let window = &head[..head.len().min(64)];
    window.windows(10).any(|w| w == MAGIC)
        || window.windows(24).any(|w| w == b"119547037146038801333356")
}

/// Walks one pickle up to its `STOP`, refusing any global not on the allow-list, and any
/// pickle longer than [`MAX_PICKLE_BYTES`]. Reads nothing past the `STOP`, so pickles
/// stored one after another are scanned by successive calls.
pub fn scan(r: &mut impl BufRead) -> std::result::Result<(), String> {
    let mut limited = r.take(MAX_PICKLE_BYTES);
    let result = scan_ops(&mut limited);
    if result.is_err() && limited.limit() == 0 {
        return Err(format!("pickle longer than {} MiB", MAX_PICKLE_BYTES >> 20));
    }
    result
}

fn scan_ops(r: &mut impl BufRead) -> std::result::Result<(), String> {
    // What the last opcode pushed, when it was a string (for `STACK_GLOBAL`), and the
    // strings put in the memo. Anything else counts as "not a known string", so a global
    // whose name is computed is refused.
    let mut recent: [Option<String>; 2] = [None, None];
    let mut memo: HashMap<u64, Option<String>> = HashMap::new();
    let mut memo_next = 0u64;
    let push = |recent: &mut [Option<String>; 2], v: Option<String>| {
        recent[0] = recent[1].take();
        recent[1] = v;
    };
    loop {
        let op = byte(r)?;
        let mut pushed: Option<Option<String>> = Some(None);
        match op {
            b'.' => return Ok(()),
            // Opcodes without arguments.
            b'(' | b'0' | b'1' | b'2' | b'N' | b'R' | b'b' | b'd' | b'l' | b't' | b's' | b'a'
            | b')' | b']' | b'}' | b'e' | b'u' | b'Q' | b'o' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88
            | 0x89 | 0x8f | 0x90 | 0x91 | 0x92 => {}
            0x97 | 0x98 => return Err("pickle uses out-of-band buffers".into()),
            0x82..=0x84 => return Err("pickle uses the copyreg extension registry".into()),
            // Text-line arguments (protocol 0).
            b'I' | b'L' | b'F' | b'P' => {
                line(r)?;
            }
            b'S' => {
                let l = line(r)?;
                let t = l.trim_end();
                pushed = Some(
                    t.strip_prefix('\'')
                        .and_then(|t| t.strip_suffix('\''))
                        .or_else(|| t.strip_prefix('"').and_then(|t| t.strip_suffix('"')))
                        .map(str::to_string),
                );
            }
            b'V' => {
                let l = line(r)?;
                pushed = Some(Some(l));
            }
            b'g' => {
                let l = line(r)?;
                let idx = l.trim().parse::<u64>().map_err(|_| "bad GET index")?;
                pushed = Some(memo.get(&idx).cloned().flatten());
            }
            b'p' => {
                let l = line(r)?;
                let idx = l.trim().parse::<u64>().map_err(|_| "bad PUT index")?;
                memo.insert(idx, recent[1].clone());
                pushed = None;
            }
            b'c' | b'i' => {
                let module = line(r)?;
                let name = line(r)?;
                check_global(&module, &name)?;
            }
            0x93 => match (&recent[0], &recent[1]) {
                (Some(module), Some(name)) => check_global(module, name)?,
                _ => return Err("pickle builds a global from a computed name".into()),
            },
            // Fixed-size arguments.
            b'J' => skip(r, 4)?,
            b'K' => skip(r, 1)?,
            b'M' => skip(r, 2)?,
            b'G' => skip(r, 8)?,
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    u64::from(byte(r)?)
                } else {
                    u64::from(u32::from_le_bytes(array(r)?))
                };
                pushed = Some(memo.get(&idx).cloned().flatten());
            }
            b'q' | b'r' => {
                let idx = if op == b'q' {
                    u64::from(byte(r)?)
                } else {
                    u64::from(u32::from_le_bytes(array(r)?))
                };
                memo.insert(idx, recent[1].clone());
                pushed = None;
            }
            0x94 => {
                memo.insert(memo_next, recent[1].clone());
                memo_next += 1;
                pushed = None;
            }
            0x80 => {
                let protocol = byte(r)?;
                if protocol > 5 {
                    return Err(format!("unsupported pickle protocol {protocol}"));
                }
                pushed = None;
            }
            0x95 => {
                skip(r, 8)?;
                pushed = None;
            }
            // Length-prefixed strings and bytes.
            b'T' | b'X' | b'B' => {
                let n = u64::from(u32::from_le_bytes(array(r)?));
                let s = counted(r, n)?;
                if op != b'B' {
                    pushed = Some(s);
                }
            }
            b'U' | b'C' | 0x8c => {
                let n = u64::from(byte(r)?);
                let s = counted(r, n)?;
                if op != b'C' {
                    pushed = Some(s);
                }
            }
            0x8d | 0x8e | 0x96 => {
                let n = u64::from_le_bytes(array(r)?);
                let s = counted(r, n)?;
                if op == 0x8d {
                    pushed = Some(s);
                }
            }
            0x8a => {
                let n = u64::from(byte(r)?);
                skip(r, n)?;
            }
            0x8b => {
                let n = i32::from_le_bytes(array(r)?);
                let n = u64::try_from(n).map_err(|_| "negative LONG4 length")?;
                skip(r, n)?;
            }
            other => return Err(format!("invalid pickle opcode 0x{other:02x}")),
        }
        if let Some(v) = pushed {
            push(&mut recent, v);
        }
    }
}

fn check_global(module: &str, name: &str) -> std::result::Result<(), String> {
    if is_allowed(module, name) {
        return Ok(());
    }
    let shown: String = format!("{module}.{name}")
        .chars()
        .take(120)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    Err(format!(
        "refuses pickle global {shown}: a weight file may only name the globals that rebuild \
         tensors (torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict, …) \
         and a training checkpoint's loss/optimizer classes"
    ))
}

fn truncated() -> String {
    "truncated pickle (no STOP opcode)".into()
}

fn byte(r: &mut impl BufRead) -> std::result::Result<u8, String> {
    Ok(array::<1>(r)?[0])
}

fn array<const N: usize>(r: &mut impl BufRead) -> std::result::Result<[u8; N], String> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).map_err(|_| truncated())?;
    Ok(b)
}

/// A protocol 0 argument line, without its newline; at most 64 KiB.
fn line(r: &mut impl BufRead) -> std::result::Result<String, String> {
    let mut buf = Vec::new();
    r.take(1 << 16)
        .read_until(b'\n', &mut buf)
        .map_err(|_| truncated())?;
    if buf.pop() != Some(b'\n') {
        return Err(truncated());
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Skips `n` bytes.
fn skip(r: &mut impl BufRead, n: u64) -> std::result::Result<(), String> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(|_| truncated())?;
    if copied != n {
        return Err(truncated());
    }
    Ok(())
}

/// A counted string: its text when short enough to be a global's name, else skipped.
fn counted(r: &mut impl BufRead, n: u64) -> std::result::Result<Option<String>, String> {
    if n > 4096 {
        skip(r, n)?;
        return Ok(None);
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b).map_err(|_| truncated())?;
    Ok(Some(String::from_utf8_lossy(&b).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_bytes(b: &[u8]) -> std::result::Result<(), String> {
        scan(&mut std::io::Cursor::new(b))
    }

    #[test]
    fn allowed_and_refused_globals() {
        // pickle.dumps(collections.OrderedDict, protocol=4)
        let ok = b"\x80\x04\x95\x17\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94.";
        scan_bytes(ok).unwrap();
        // pickle.dumps(os.system, protocol=4) on Linux
        let bad = b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.";
        let e = scan_bytes(bad).unwrap_err();
        assert!(e.contains("refuses pickle global posix.system"), "{e}");
        // protocol 0: cos\nsystem\n
        let e = scan_bytes(b"cos\nsystem\n(S'id'\ntR.").unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        // A name built at run time (not a literal string) is refused.
        let e = scan_bytes(b"\x80\x04K\x01K\x02\x93.").unwrap_err();
        assert!(e.contains("computed"), "{e}");
        // A Lightning checkpoint's extras are named, not run: allowed.
        for (m, n) in [
            ("functools", "partial"),
            ("monai.losses.dice", "DiceCELoss"),
            ("torch.optim.adamw", "AdamW"),
            ("torch.optim.lr_scheduler", "ReduceLROnPlateau"),
            ("__builtin__", "set"),
        ] {
            check_global(m, n).unwrap();
        }
        for (m, n) in [
            ("builtins", "eval"),
            ("builtins", "getattr"),
            ("subprocess", "Popen"),
            ("torch.optim", "os_system"),
            ("monai.losses", "__import__"),
        ] {
            assert!(check_global(m, n).is_err(), "{m}.{n}");
        }
        assert!(
            scan_bytes(b"\x80\x04\x8c\x05")
                .unwrap_err()
                .contains("truncated")
        );
        assert!(scan_bytes(b"\xff").unwrap_err().contains("opcode 0xff"));
    }
}

//! The GPU-clean rules, checked on the source (docs/devices.md):
//!
//! 1. no f64 tensor is made on a device that may not have f64 (Metal);
//! 2. a training step reads from the device only through `crate::host`,
//!    which gathers the step's scalars into one transfer (and counts it:
//!    `src/gpu_path_tests.rs` checks a whole step makes exactly one).
//!
//! Library code outside `src/host.rs` and the CPU-only kernels
//! (`src/ops/kernels/`, `src/optim/fused.rs`) may not read tensors to the
//! host (`to_scalar`, `to_vec*`), name f64 tensors (`DType::F64` other than
//! to test or dispatch on a dtype), or build tensors from host data or Rust
//! scalars (`Tensor::new`, `from_vec`, `from_slice`, `from_iter`, `full`,
//! `arange`) unless they go to `&Device::Cpu`. A line that must is marked with a `// host-ok:`
//! comment saying why (on the line or opening the comment just above the
//! statement): checkpoint loading, evaluation, data upload.

use std::path::{Path, PathBuf};

/// Files outside the rules: the gateway itself and code that only ever
/// runs on CPU storage.
const EXEMPT: &[&str] = &["src/host.rs", "src/gpu_path_tests.rs", "src/optim/fused.rs"];
const EXEMPT_DIRS: &[&str] = &["src/ops/kernels/"];

const FORBIDDEN: &[&str] = &[
    ".to_scalar",
    ".to_vec0",
    ".to_vec1",
    ".to_vec2",
    ".to_vec3",
    "DType::F64",
    "Tensor::new(",
    "Tensor::from_vec(",
    "Tensor::from_slice(",
    "Tensor::from_iter(",
    "Tensor::full(",
    "Tensor::arange",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether `token` at `line` breaks the rules (before exemptions).
fn offends(line: &str, token: &str) -> bool {
    if !line.contains(token) {
        return false;
    }
    match token {
        // Testing or dispatching on a dtype the tensor already has.
        "DType::F64" => {
            line.split("DType::F64")
                .skip(1)
                .any(|after| !after.trim_start().starts_with("=>"))
                && !line.contains("== DType::F64")
                && !line.contains("!= DType::F64")
        }
        // Tensors made on the CPU explicitly.
        "Tensor::new("
        | "Tensor::from_vec("
        | "Tensor::from_slice("
        | "Tensor::from_iter("
        | "Tensor::full("
        | "Tensor::arange" => !line.contains("&Device::Cpu"),
        _ => true,
    }
}

/// The offending lines of one file: (line number, text).
fn offences(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut covered = false;
    let mut i = 0;
    while i < lines.len() {
        let raw = lines[i];
        let t = raw.trim();
        // The unit tests at the end of a file are not library code.
        if t == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|l| l.trim() == "mod tests {") {
            break;
        }
        if t.starts_with("//") {
            if t.starts_with("// host-ok:") {
                covered = true;
            }
            i += 1;
            continue;
        }
        let code = raw.split("//").next().unwrap_or("");
        let marked = covered || raw.contains("// host-ok:");
        if !marked {
            for token in FORBIDDEN {
                if offends(code, token) {
                    out.push((i + 1, format!("`{token}` in: {}", t)));
                }
            }
        }
        // A marker covers the statement that follows it.
        if covered && (t.ends_with(';') || t.ends_with('{') || t.ends_with('}') || t.ends_with(','))
        {
            covered = false;
        }
        i += 1;
    }
    out
}

#[test]
fn no_f64_on_the_device_and_host_reads_only_through_the_gateway() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut report = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if EXEMPT.contains(&rel.as_str()) || EXEMPT_DIRS.iter().any(|d| rel.starts_with(d)) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, what) in offences(&text) {
            report.push(format!("{rel}:{n}: {what}"));
        }
    }
    assert!(
        report.is_empty(),
        "GPU-clean rules broken (see docs/devices.md; route reads and constants through \
         crate::host, or mark a deliberate host transfer with `// host-ok: why`):\n{}",
        report.join("\n")
    );
}

#[test]
fn the_scan_catches_what_it_should() {
    // The patterns of the code this replaced (one read per parameter in
    // f64, a one-hot matrix built on the host).
    let old = r#"
        let s = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let coef = Tensor::from_vec(coef, (n, c), logits.device())?.to_dtype(logits.dtype())?;
        let neg = Tensor::full(f64::NEG_INFINITY, (2, 2), s.device())?;
    "#;
    assert_eq!(offences(old).len(), 4, "{:?}", offences(old));
    // Allowed: dtype tests and dispatch, explicit CPU tensors, marked lines,
    // comments and the unit tests at the end of a file.
    let ok = r#"
        if t.dtype() == DType::F64 { return Ok(()); }
        match t.dtype() { DType::F64 => {} _ => {} }
        let step = Tensor::new(7i64, &Device::Cpu)?;
        // host-ok: evaluation reads the predictions.
        let p = pred
            .to_vec1::<u32>()?;
        let q = x.to_vec1::<f32>()?; // host-ok: tested elsewhere
        // x.to_scalar::<f64>() in a comment
        #[cfg(test)]
        mod tests {
            fn f() { let _ = t.to_scalar::<f64>(); }
        }
    "#;
    assert_eq!(offences(ok), vec![]);
}

//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! radflow links ONNX Runtime at run time (`ort`'s `load-dynamic`), so one binary runs
//! on the CPU wheel on a laptop and on the CUDA build on a GPU node. The library it
//! needs is the one in the pinned `onnxruntime==1.31.1` wheel, which ships only the
//! versioned name `libonnxruntime.so.1.31.1`. [`locate_library`] looks for it where an
//! operator following the README will have put it, and [`init`] loads it, refuses any
//! other release (an older one fails in confusing ways deep inside a session) and
//! creates the process-wide `ort` environment that every session is built from.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Versions of ONNX Runtime radflow accepts: the 1.31 series (`ort` 2.0.0-rc.15 is
/// built against API 31).
pub const SUPPORTED_SERIES: &str = "1.31";

/// File name prefix of the library in the pinned wheel.
const LIBRARY_PREFIX: &str = "libonnxruntime.so.1.31";

/// How an operator gets a library radflow accepts; part of every error message here.
pub const INSTALL_HINT: &str = "from the radflow folder run `python3 -m venv .venv && \
     .venv/bin/pip install onnxruntime==1.31.1`, or set ORT_DYLIB_PATH (flag --ort-lib) to \
     the path of libonnxruntime.so.1.31.1";

/// The library in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// Absolute path of the loaded `libonnxruntime`.
    pub library: PathBuf,
    /// Version string reported by the library itself, e.g. `1.31.1`.
    pub version: String,
    /// Execution providers built into the library (`CPUExecutionProvider`, and
    /// `CUDAExecutionProvider`, `TensorrtExecutionProvider` in onnxruntime-gpu). Built
    /// in is not usable: CUDA still needs its libraries and a GPU.
    pub providers: Vec<String>,
}

/// Why ONNX Runtime could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "the ONNX Runtime library was not found (looked in: {searched}); to fix it, {INSTALL_HINT}"
    )]
    NotFound { searched: String },
    #[error("the ONNX Runtime library given as {path} does not exist; to fix it, {INSTALL_HINT}")]
    Missing { path: PathBuf },
    #[error("cannot load the ONNX Runtime library {path}: {reason}; to fix it, {INSTALL_HINT}")]
    Load { path: PathBuf, reason: String },
    #[error(
        "the ONNX Runtime library {path} is version {version}, but radflow needs {SUPPORTED_SERIES}.x; to fix it, {INSTALL_HINT}"
    )]
    WrongVersion { path: PathBuf, version: String },
    #[error("cannot create the ONNX Runtime environment from {path}: {reason}")]
    Environment { path: PathBuf, reason: String },
}

/// Finds `libonnxruntime.so.1.31*`. The first of these that applies wins:
///
/// 1. `explicit` (the CLI's `--ort-lib`), else the `ORT_DYLIB_PATH` environment
///    variable: a file, or a folder holding the library. When given, it must exist;
///    nothing else is tried, so an operator's choice is never silently replaced;
/// 2. `.venv/lib/python3*/site-packages/onnxruntime/capi/` in the current folder or the
///    nearest ancestor that has a `.venv` (tests run from a crate's folder);
/// 3. the same under each ancestor of the running executable's folder that has a
///    `.venv` (so `target/release/radflow` finds the repository's `.venv`);
/// 4. the `onnxruntime` package that `python3` imports.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let from_env = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    search(
        explicit.map(Path::to_owned).or(from_env),
        cwd.as_deref(),
        exe.as_deref(),
        python_package_dir,
    )
}

/// [`locate_library`] with its inputs passed in, so the order is testable.
fn search(
    explicit: Option<PathBuf>,
    cwd: Option<&Path>,
    exe: Option<&Path>,
    python: impl FnOnce() -> Option<PathBuf>,
) -> Result<PathBuf, RuntimeError> {
    if let Some(path) = explicit {
        let path = std::path::absolute(&path).unwrap_or(path);
        if path.is_dir() {
            return library_in(&path).ok_or(RuntimeError::Missing {
                path: path.join(format!("{LIBRARY_PREFIX}*")),
            });
        }
        if path.is_file() {
            return Ok(path);
        }
        return Err(RuntimeError::Missing { path });
    }

    let mut searched = Vec::new();
    if let Some(cwd) = cwd {
        for dir in cwd.ancestors() {
            if dir != cwd && !dir.join(".venv").is_dir() {
                continue;
            }
            if let Some(found) = library_in_venv(dir) {
                return Ok(found);
            }
            searched.push(format!("{}/.venv", dir.display()));
        }
    }
    if let Some(exe) = exe {
        for dir in exe.ancestors().skip(1) {
            if cwd.is_some_and(|c| c.starts_with(dir)) || !dir.join(".venv").is_dir() {
                continue;
            }
            if let Some(found) = library_in_venv(dir) {
                return Ok(found);
            }
            searched.push(format!("{}/.venv", dir.display()));
        }
    }
    if let Some(package) = python() {
        if let Some(found) = library_in(&package.join("capi")) {
            return Ok(found);
        }
        searched.push(format!("{}/capi", package.display()));
    } else {
        searched.push("python3's onnxruntime package (not importable)".into());
    }
    Err(RuntimeError::NotFound {
        searched: searched.join(", "),
    })
}

/// The library inside `<root>/.venv/lib/python3*/site-packages/onnxruntime/capi/`.
fn library_in_venv(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv").join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    pythons.sort();
    pythons.iter().rev().find_map(|python| {
        library_in(
            &python
                .join("site-packages")
                .join("onnxruntime")
                .join("capi"),
        )
    })
}

/// The highest `libonnxruntime.so.1.31*` file in a folder.
fn library_in(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(LIBRARY_PREFIX))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .max()
}

/// Folder of the `onnxruntime` package that `python3` imports, if any.
fn python_package_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// The loaded runtime: kept for the life of the process.
struct Runtime {
    info: RuntimeInfo,
    environment: ort::environment::Environment,
    /// Our own handle on the library, opened to read its version before `ort` loads
    /// it; held so the library is never unloaded between the two.
    _library: libloading::Library,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Locates (see [`locate_library`]) and loads ONNX Runtime and creates the process's
/// `ort` environment. Idempotent: later calls return the first result (ONNX Runtime
/// cannot be swapped within a process); a failed call may be retried.
pub fn init(explicit: Option<&Path>) -> Result<RuntimeInfo, RuntimeError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(already_loaded(rt, explicit));
    }
    let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = RUNTIME.get() {
        return Ok(already_loaded(rt, explicit));
    }

    let path = locate_library(explicit)?;
    let path = path.canonicalize().unwrap_or(path);
    let (library, version) = read_version(&path)?;
    if !is_supported(&version) {
        return Err(RuntimeError::WrongVersion { path, version });
    }
    let environment = ort::init_from(&path)
        .map_err(|e| RuntimeError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?
        .with_name("radflow")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError::Environment {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let providers = available_providers();
    tracing::info!(
        library = %path.display(),
        %version,
        providers = ?providers,
        "ONNX Runtime loaded"
    );

    let info = RuntimeInfo {
        library: path,
        version,
        providers,
    };
    let runtime = Runtime {
        info: info.clone(),
        environment,
        _library: library,
    };
    // Cannot fail: the INIT lock is held and the cell was empty.
    let _ = RUNTIME.set(runtime);
    Ok(info)
}

/// The runtime loaded by [`init`], if any.
pub fn info() -> Option<RuntimeInfo> {
    RUNTIME.get().map(|rt| rt.info.clone())
}

/// The process's `ort` environment, loading the runtime with the default search
/// first if [`init`] has not been called.
pub(crate) fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    if RUNTIME.get().is_none() {
        init(None)?;
    }
    Ok(&RUNTIME
        .get()
        .expect("init succeeded, so the runtime is set")
        .environment)
}

fn already_loaded(rt: &Runtime, explicit: Option<&Path>) -> RuntimeInfo {
    if let Some(asked) = explicit {
        let asked = asked.canonicalize().unwrap_or_else(|_| asked.to_owned());
        if asked != rt.info.library && !rt.info.library.starts_with(&asked) {
            tracing::warn!(
                loaded = %rt.info.library.display(),
                asked = %asked.display(),
                "ONNX Runtime is already loaded from another file; keeping it"
            );
        }
    }
    rt.info.clone()
}

/// The execution providers built into the loaded library (`GetAvailableProviders`);
/// empty if the library cannot say.
fn available_providers() -> Vec<String> {
    let api = ort::api();
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut len: std::ffi::c_int = 0;
    // SAFETY: the library is loaded (`ort::init_from` succeeded); the call fills a
    // library-owned array of `len` NUL-terminated strings, released below.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut len) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is owned by us and released once.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Vec::new();
    }
    if list.is_null() {
        return Vec::new();
    }
    let names = (0..usize::try_from(len).unwrap_or(0))
        .filter_map(|i| {
            // SAFETY: `i < len` entries of the array are valid C strings.
            let name = unsafe { *list.add(i) };
            (!name.is_null()).then(|| {
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            })
        })
        .collect();
    // SAFETY: releases the array obtained above, with its length.
    let status = unsafe { (api.ReleaseAvailableProviders)(list, len) };
    if !status.0.is_null() {
        // SAFETY: as above.
        unsafe { (api.ReleaseStatus)(status.0) };
    }
    names
}

/// Whether a version string belongs to the supported series (`1.31` or `1.31.x`).
fn is_supported(version: &str) -> bool {
    version == SUPPORTED_SERIES
        || version
            .strip_prefix(SUPPORTED_SERIES)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Opens the library and asks it for its version (`OrtGetApiBase()->GetVersionString`).
fn read_version(path: &Path) -> Result<(libloading::Library, String), RuntimeError> {
    let load_error = |reason: String| RuntimeError::Load {
        path: path.to_owned(),
        reason,
    };
    // SAFETY: loading a shared library runs its initialisers; this is the library the
    // operator pointed us at (or the pinned wheel's), which `ort` loads right after
    // anyway. No symbol is used beyond the two C entry points below.
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| load_error(e.to_string()))?;
    let version = {
        // SAFETY: `OrtGetApiBase` is ONNX Runtime's stable C entry point with this
        // signature in every release.
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            unsafe { library.get(b"OrtGetApiBase") }.map_err(|_| {
                load_error("it does not export OrtGetApiBase, so it is not ONNX Runtime".into())
            })?;
        // SAFETY: calling the entry point has no preconditions; the returned struct is
        // static data owned by the library, which stays loaded while we read it.
        let base = unsafe { get_base() };
        if base.is_null() {
            return Err(load_error("OrtGetApiBase returned null".into()));
        }
        // SAFETY: `base` is non-null and points to the library's static OrtApiBase;
        // GetVersionString returns a static NUL-terminated string.
        let raw = unsafe { ((*base).GetVersionString)() };
        if raw.is_null() {
            return Err(load_error("it reports no version".into()));
        }
        // SAFETY: non-null, NUL-terminated, static (see above).
        unsafe { CStr::from_ptr(raw) }
            .to_str()
            .map_err(|_| load_error("its version string is not UTF-8".into()))?
            .to_owned()
    };
    Ok((library, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "radflow-runtime-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fake_venv(root: &Path, python: &str, file: &str) -> PathBuf {
        let capi = root
            .join(".venv/lib")
            .join(python)
            .join("site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        let lib = capi.join(file);
        std::fs::write(&lib, b"").unwrap();
        lib
    }

    #[test]
    fn search_order_explicit_then_cwd_then_exe_ancestors_then_python() {
        let root = temp_dir("order");
        let cwd = root.join("work");
        let repo = root.join("repo");
        let exe = repo.join("target/release/radflow");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        let py = root.join("py/onnxruntime");
        std::fs::create_dir_all(py.join("capi")).unwrap();
        let py_lib = py.join("capi/libonnxruntime.so.1.31.1");
        std::fs::write(&py_lib, b"").unwrap();

        // Only python3's package exists.
        let found = search(None, Some(&cwd), Some(&exe), || Some(py.clone())).unwrap();
        assert_eq!(found, py_lib);

        // The repository's .venv above the executable beats python3.
        let repo_lib = fake_venv(&repo, "python3.11", "libonnxruntime.so.1.31.1");
        let found = search(None, Some(&cwd), Some(&exe), || Some(py.clone())).unwrap();
        assert_eq!(found, repo_lib);

        // ./.venv beats both; the unversioned or other-version names are ignored.
        fake_venv(&cwd, "python3.12", "libonnxruntime.so.1.22.0");
        let cwd_lib = fake_venv(&cwd, "python3.11", "libonnxruntime.so.1.31.1");
        let found = search(None, Some(&cwd), Some(&exe), || None).unwrap();
        assert_eq!(found, cwd_lib);

        // An explicit path wins, as a file or as its folder.
        let found = search(Some(py_lib.clone()), Some(&cwd), Some(&exe), || None).unwrap();
        assert_eq!(found, py_lib);
        let found = search(Some(py.join("capi")), Some(&cwd), Some(&exe), || None).unwrap();
        assert_eq!(found, py_lib);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn explicit_path_that_does_not_exist_is_an_error_with_the_fix() {
        let err = search(
            Some(PathBuf::from("/nonexistent/libonnxruntime.so.1.31.1")),
            None,
            None,
            || panic!("python must not be asked when a path is given"),
        )
        .unwrap_err();
        assert!(matches!(err, RuntimeError::Missing { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/libonnxruntime.so.1.31.1"),
            "{msg}"
        );
        assert!(msg.contains("pip install onnxruntime==1.31.1"), "{msg}");
    }

    #[test]
    fn nothing_found_says_how_to_fix_it() {
        let root = temp_dir("none");
        let err = search(None, Some(&root), Some(&root.join("bin/radflow")), || None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RuntimeError::NotFound { .. }), "{msg}");
        assert!(
            msg.contains("python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.31.1"),
            "{msg}"
        );
        assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_the_1_31_series_is_supported() {
        assert!(is_supported("1.31.1"));
        assert!(is_supported("1.31.0"));
        assert!(is_supported("1.31"));
        assert!(!is_supported("1.310.0"));
        assert!(!is_supported("1.22.0"));
        assert!(!is_supported("1.32.0"));
    }

    #[test]
    fn a_file_that_is_not_a_library_is_refused_with_the_fix() {
        let root = temp_dir("bogus");
        let lib = root.join("libonnxruntime.so.1.31.1");
        std::fs::write(&lib, b"not an ELF file").unwrap();
        let err = read_version(&lib).unwrap_err();
        assert!(matches!(err, RuntimeError::Load { .. }), "{err}");
        assert!(err.to_string().contains("ORT_DYLIB_PATH"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}

//! The unsafe edge of the CUDA path: libraries loaded at run time through cudarc, one primary
//! context per device (the one PyTorch uses), NVRTC compilation to a cubin for the device's
//! architecture, a module cache per device and source, and raw launches on a caller's stream.
//!
//! Device pointers handed to the kernels are plain integers from the caller (PyTorch tensors'
//! `data_ptr()`): a wrong one makes the GPU report an illegal address on that stream; it cannot
//! touch host memory.

use super::source::{ActType, LutKernel};
use crate::{HiggsError, Result};
use cudarc::driver::{result as driver, sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// An error of the CUDA driver or compiler, with what was being done.
pub(crate) fn cuda_error(what: &str, detail: impl std::fmt::Debug) -> HiggsError {
    HiggsError::Unsupported(format!("CUDA: {what} failed: {detail:?}"))
}

/// Whether the driver library (libcuda) and NVRTC can be loaded; the reason if not.
pub(crate) fn libraries() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the candidate library names and close them again; no
    // symbol is called.
    let driver_present = unsafe { sys::is_culib_present() };
    if !driver_present {
        return Err("the NVIDIA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into());
    }
    // SAFETY: as above, for NVRTC.
    let nvrtc_present = unsafe { nvrtc::sys::is_culib_present() };
    if !nvrtc_present {
        return Err(
            "NVRTC (libnvrtc.so.13 or .12) was not found: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel, \
             or import torch first (higgs_rs loads the NVRTC that PyTorch ships)"
                .into(),
        );
    }
    Ok(())
}

/// Number of CUDA devices, after checking the libraries.
pub(crate) fn device_count() -> std::result::Result<usize, String> {
    libraries()?;
    driver::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count =
        driver::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if count <= 0 {
        return Err("the NVIDIA driver reports no CUDA device".into());
    }
    Ok(count as usize)
}

/// A compiled kernel and the shared memory it declares statically.
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    function: CudaFunction,
    static_shared: usize,
    max_dynamic_shared: usize,
}

/// What a module is compiled from; the cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ModuleKey {
    LutGemm {
        bits: u32,
        act: ActType,
        kernel: LutKernel,
        segments: bool,
    },
    Hadamard {
        order: usize,
        act: ActType,
        /// Blocks per cluster of `hadamard_cluster`; 0: the one-block `hadamard_rotate`.
        cluster: usize,
    },
    Rope {
        act: ActType,
    },
}

struct Module {
    _module: Arc<CudaModule>,
    kernels: HashMap<String, Kernel>,
}

/// One GPU: its primary context, properties, and compiled modules.
pub(crate) struct Device {
    ctx: Arc<CudaContext>,
    pub name: String,
    pub sm_count: usize,
    pub arch: (i32, i32),
    pub max_shared_optin: usize,
    modules: Mutex<HashMap<ModuleKey, Arc<Module>>>,
}

/// The device with this ordinal, set up once per process.
pub(crate) fn device(ordinal: usize) -> Result<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    // A poisoned lock only means another thread panicked while inserting; the map stays valid.
    let mut map = devices.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = map.get(&ordinal) {
        return Ok(Arc::clone(d));
    }
    let count = device_count().map_err(HiggsError::Unsupported)?;
    if ordinal >= count {
        return Err(HiggsError::invalid(format!(
            "CUDA device {ordinal} does not exist: this machine has {count}"
        )));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| cuda_error("retaining the device's primary context", e))?;
    let attribute = |a: sys::CUdevice_attribute| {
        ctx.attribute(a)
            .map_err(|e| cuda_error("reading a device attribute", e))
    };
    let arch = (
        attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    if arch < (8, 0) {
        return Err(HiggsError::Unsupported(format!(
            "CUDA device {ordinal} has compute capability {}.{}; the kernels need 8.0 or newer (bf16 tensor cores)",
            arch.0, arch.1
        )));
    }
    let d = Arc::new(Device {
        name: ctx.name().unwrap_or_else(|_| "unknown".into()),
        sm_count: attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize,
        max_shared_optin: attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as usize,
        arch,
        ctx,
        modules: Mutex::new(HashMap::new()),
    });
    map.insert(ordinal, Arc::clone(&d));
    Ok(d)
}

/// NVRTC's log of a program, as text.
fn program_log(prog: nvrtc::sys::nvrtcProgram) -> String {
    // SAFETY: `prog` is a live program created by `create_program` and not yet destroyed.
    match unsafe { nvrtc::result::get_program_log(prog) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// Compile `source` to a cubin for `arch` with NVRTC.
fn compile_cubin(source: &str, name: &str, arch: (i32, i32)) -> Result<Vec<u8>> {
    let src =
        CString::new(source).map_err(|_| HiggsError::invalid("kernel source holds a NUL byte"))?;
    let cname =
        CString::new(name).map_err(|_| HiggsError::invalid("kernel name holds a NUL byte"))?;
    let prog = nvrtc::result::create_program(&src, Some(&cname))
        .map_err(|e| cuda_error("nvrtcCreateProgram", e))?;
    let verbose = std::env::var_os("HIGGS_CUDA_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0");
    let mut options = vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "-std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    if verbose {
        options.push("--ptxas-options=-v".to_string());
    }
    // SAFETY: `prog` was just created and is destroyed below, after its last use.
    let compiled = unsafe { nvrtc::result::compile_program(prog, &options) };
    let log = program_log(prog);
    let result = compiled
        .map_err(|e| {
            cuda_error(
                &format!("NVRTC compiling {name} for sm_{}{} ({e:?})", arch.0, arch.1),
                log.trim(),
            )
        })
        .and_then(|()| {
            if verbose {
                eprintln!("higgs_rs: NVRTC {name} sm_{}{}:\n{log}", arch.0, arch.1);
            }
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
            unsafe { nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| cuda_error("nvrtcGetCUBINSize", e))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds exactly the `size` bytes NVRTC asked for.
            unsafe { nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
                .result()
                .map_err(|e| cuda_error("nvrtcGetCUBIN", e))?;
            Ok(cubin)
        });
    // SAFETY: `prog` is live and not used after this.
    if let Err(e) = unsafe { nvrtc::result::destroy_program(prog) } {
        return Err(cuda_error("nvrtcDestroyProgram", e));
    }
    result
}

/// NVRTC's version as (major, minor).
fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| cuda_error("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// 64-bit FNV-1a: a stable content hash for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where compiled kernels are kept between processes: `$HIGGS_CUDA_CACHE` (`off` disables),
/// else `$XDG_CACHE_HOME/higgs_rs/cuda`, else `~/.cache/higgs_rs/cuda`.
fn cache_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os("HIGGS_CUDA_CACHE") {
        Some(v) if v == "off" || v == "0" || v.is_empty() => None,
        Some(v) => Some(v.into()),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
            .map(|d| d.join("higgs_rs").join("cuda")),
    }
}

/// [`compile_cubin`] through the on-disk cache (keyed by source, architecture and NVRTC
/// version). A cache that cannot be read or written is skipped, never an error.
fn cached_cubin(source: &str, name: &str, arch: (i32, i32)) -> Result<Vec<u8>> {
    let verbose = std::env::var_os("HIGGS_CUDA_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0");
    let version = nvrtc_version()?;
    let key = fnv1a(&[
        source.as_bytes(),
        format!("sm_{}{} nvrtc {}.{}", arch.0, arch.1, version.0, version.1).as_bytes(),
    ]);
    let path = cache_dir().map(|d| {
        let stem: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        d.join(format!("{stem}-{key:016x}.cubin"))
    });
    if let (Some(p), false) = (&path, verbose) {
        if let Ok(bytes) = std::fs::read(p) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok(bytes);
            }
        }
    }
    let cubin = compile_cubin(source, name, arch)?;
    if let Some(p) = path {
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let written = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, &cubin))
            .and_then(|()| std::fs::rename(&tmp, &p));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}

impl Device {
    /// The kernel `name` of module `key`, compiling the module from `source()` on first use.
    pub(crate) fn kernel(
        &self,
        key: ModuleKey,
        name: &str,
        source: impl FnOnce() -> Result<(String, Vec<String>)>,
    ) -> Result<Kernel> {
        // Compiling under the lock keeps two threads from building the same module twice.
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let module = match modules.get(&key) {
            Some(m) => Arc::clone(m),
            None => {
                let m = Arc::new(self.build(key, source)?);
                modules.insert(key, Arc::clone(&m));
                m
            }
        };
        module
            .kernels
            .get(name)
            .cloned()
            .ok_or_else(|| HiggsError::invalid(format!("CUDA module {key:?} has no kernel {name}")))
    }

    fn build(
        &self,
        key: ModuleKey,
        source: impl FnOnce() -> Result<(String, Vec<String>)>,
    ) -> Result<Module> {
        let (code, names) = source()?;
        let cubin = cached_cubin(&code, &format!("{key:?}.cu"), self.arch)?;
        let module = self
            .ctx
            .load_module(nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| cuda_error(&format!("loading module {key:?}"), e))?;
        let mut kernels = HashMap::new();
        for name in names {
            let function = module
                .load_function(&name)
                .map_err(|e| cuda_error(&format!("finding kernel {name}"), e))?;
            // SAFETY: `function` belongs to the module just loaded, which `Module` keeps alive.
            let static_shared = unsafe {
                driver::function::get_function_attribute(
                    function.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                )
            }
            .map_err(|e| cuda_error("reading a kernel's shared memory size", e))?
                as usize;
            let max_dynamic_shared = self.max_shared_optin.saturating_sub(static_shared);
            // Allow launches up to the device's opt-in limit; occupancy follows each launch's own size.
            // SAFETY: as above.
            unsafe {
                driver::function::set_function_attribute(
                    function.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    max_dynamic_shared as i32,
                )
            }
            .map_err(|e| cuda_error("raising a kernel's shared memory limit", e))?;
            kernels.insert(
                name,
                Kernel {
                    function,
                    static_shared,
                    max_dynamic_shared,
                },
            );
        }
        Ok(Module {
            _module: module,
            kernels,
        })
    }

    /// How many blocks of `kernel` fit on one multiprocessor at once.
    pub(crate) fn blocks_per_sm(
        &self,
        kernel: &Kernel,
        block: u32,
        dynamic_shared: usize,
    ) -> Result<usize> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("making the device's context current", e))?;
        let mut blocks: std::ffi::c_int = 0;
        // SAFETY: the function is alive (its module is cached for the process); `blocks` is a
        // valid out-pointer.
        unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut blocks,
                kernel.function.cu_function(),
                block as std::ffi::c_int,
                dynamic_shared,
            )
        }
        .result()
        .map_err(|e| cuda_error("computing occupancy", describe(e)))?;
        Ok(blocks.max(1) as usize)
    }

    /// Launch `kernel`, whose only parameter is a `P` by value, on the raw stream `stream`
    /// (0 = the legacy default stream). Nothing is synchronized or allocated.
    ///
    /// `P` must be the `#[repr(C)]` mirror of the kernel's parameter struct; the kernel reads
    /// only device memory through it.
    pub(crate) fn launch<P: Copy>(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        dynamic_shared: usize,
        stream: u64,
        params: &P,
    ) -> Result<()> {
        self.launch_with(kernel, grid, block, dynamic_shared, stream, params, false)
    }

    /// [`Device::launch`], optionally as a programmatic dependent launch (Hopper and newer): the
    /// kernel may start before the previous kernel on the stream finishes, and must execute
    /// `griddepcontrol.wait` before touching anything that kernel writes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_with<P: Copy>(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        dynamic_shared: usize,
        stream: u64,
        params: &P,
        programmatic: bool,
    ) -> Result<()> {
        self.launch_ex(
            kernel,
            grid,
            block,
            dynamic_shared,
            stream,
            params,
            programmatic,
            1,
        )
    }

    /// [`Device::launch_with`] with thread-block clusters of `cluster` consecutive blocks along x
    /// (Hopper and newer; `grid.0` a multiple of `cluster`, at most 8): the blocks of a cluster run
    /// at once on SMs of one GPC and can read each other's shared memory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_ex<P: Copy>(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        dynamic_shared: usize,
        stream: u64,
        params: &P,
        programmatic: bool,
        cluster: u32,
    ) -> Result<()> {
        if cluster > 1 && (self.arch < (9, 0) || cluster > 8 || !grid.0.is_multiple_of(cluster)) {
            return Err(HiggsError::Unsupported(format!(
                "a cluster launch of {cluster} blocks (grid {grid:?}) needs compute capability 9.0 and \
                 at most 8 blocks per cluster dividing the grid; this GPU is {}.{}",
                self.arch.0, self.arch.1
            )));
        }
        if dynamic_shared > kernel.max_dynamic_shared {
            return Err(HiggsError::Unsupported(format!(
                "a kernel launch needs {dynamic_shared} bytes of shared memory; this GPU allows {} ({} static)",
                kernel.max_dynamic_shared, kernel.static_shared
            )));
        }
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 {
            return Err(HiggsError::invalid(format!(
                "CUDA grid {grid:?} is out of range"
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("making the device's context current", e))?;
        let mut args = [params as *const P as *mut c_void];
        let stream = stream as usize as sys::CUstream;
        let programmatic = programmatic && self.arch >= (9, 0) && !programmatic_launch_disabled();
        if programmatic || cluster > 1 {
            let mut attributes = Vec::with_capacity(2);
            if programmatic {
                attributes.push(sys::CUlaunchAttribute {
                    id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                    pad: [0; 4],
                    value: sys::CUlaunchAttributeValue {
                        programmaticStreamSerializationAllowed: 1,
                    },
                });
            }
            if cluster > 1 {
                attributes.push(sys::CUlaunchAttribute {
                    id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
                    pad: [0; 4],
                    value: sys::CUlaunchAttributeValue {
                        clusterDim: sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
                            x: cluster,
                            y: 1,
                            z: 1,
                        },
                    },
                });
            }
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: dynamic_shared as u32,
                hStream: stream,
                attrs: attributes.as_mut_ptr(),
                numAttrs: attributes.len() as u32,
            };
            // SAFETY: as for `cuLaunchKernel` below; `config` and the attributes it points to
            // live until the call returns.
            return unsafe {
                sys::cuLaunchKernelEx(
                    &config,
                    kernel.function.cu_function(),
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .map_err(|e| cuda_error("launching a kernel", describe(e)));
        }
        // SAFETY: the function is alive (its module is cached for the process); `args` holds
        // one pointer to a `P`, the kernel's single by-value parameter, which the driver copies
        // before returning; the stream handle comes from the caller (PyTorch's current stream on
        // this device, or 0).
        unsafe {
            sys::cuLaunchKernel(
                kernel.function.cu_function(),
                grid.0,
                grid.1,
                grid.2,
                block,
                1,
                1,
                dynamic_shared as u32,
                stream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| cuda_error("launching a kernel", describe(e)))
    }
}

/// `HIGGS_CUDA_PDL=0` turns programmatic dependent launches off (for comparisons).
/// `HIGGS_CUDA_<name>=0` in the environment (read once): switches a fast path off, for
/// benchmarks that compare against it.
pub(crate) fn switched_off(name: &'static str) -> bool {
    static OFF: OnceLock<Mutex<HashMap<&'static str, bool>>> = OnceLock::new();
    let map = OFF.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry(name)
        .or_insert_with(|| std::env::var_os(format!("HIGGS_CUDA_{name}")).is_some_and(|v| v == "0"))
}

fn programmatic_launch_disabled() -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os("HIGGS_CUDA_PDL").is_some_and(|v| v == "0"))
}

/// The driver's name and text for an error code.
fn describe(e: driver::DriverError) -> String {
    let name = e
        .error_name()
        .map(CStr::to_string_lossy)
        .unwrap_or_default();
    let text = e
        .error_string()
        .map(CStr::to_string_lossy)
        .unwrap_or_default();
    format!("{name}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::source::{self, HadamardShape};

    /// Every kernel source compiles with NVRTC for Ampere and Hopper. Needs only NVRTC, no GPU
    /// (e.g. `LD_LIBRARY_PATH=.venv/lib/python3.11/site-packages/nvidia/cu13/lib`); skipped
    /// with a message where NVRTC is absent.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            eprintln!("NVRTC not found: kernel compilation not checked");
            return;
        }
        for arch in [(8, 0), (9, 0)] {
            for act in [ActType::F16, ActType::Bf16] {
                for bits in [2, 3, 4] {
                    for kernel in [
                        LutKernel::Mma { mt: 2, nt: 8 },
                        LutKernel::Gemv { cpb: 2 },
                        LutKernel::Gemv { cpb: 4 },
                        LutKernel::Dequantize,
                    ] {
                        if arch == (8, 0) && bits != 4 {
                            continue;
                        }
                        // Grouped-launch modules (LUT_SEGMENTS: lut_gemv only) and plain ones.
                        for segments in [false, true] {
                            if segments && !matches!(kernel, LutKernel::Gemv { .. }) {
                                continue;
                            }
                            let cubin = compile_cubin(
                                &source::lut_gemm(bits, act, kernel, segments),
                                "lut_gemm.cu",
                                arch,
                            )
                            .unwrap_or_else(|e| {
                                panic!(
                                    "bits {bits} {act:?} {kernel:?} segments {segments} sm_{}{}: {e}",
                                    arch.0, arch.1
                                )
                            });
                            assert!(cubin.starts_with(b"\x7fELF"));
                            // Both entry points (general and plain) are in the module.
                            for name in [Some(kernel.name()), kernel.plain_name()]
                                .into_iter()
                                .flatten()
                            {
                                assert!(
                                    cubin
                                        .windows(name.len() + 1)
                                        .any(|w| w[..name.len()] == *name.as_bytes()
                                            && w[name.len()] == 0),
                                    "{name} missing from the {kernel:?} module"
                                );
                            }
                        }
                    }
                }
                for order in [64, 4096, 32768, 12, 28 * 512, 784 * 16, 240 * 4] {
                    let shape = HadamardShape::new(order).unwrap();
                    compile_cubin(&source::hadamard(&shape, act).unwrap(), "hadamard.cu", arch)
                        .unwrap_or_else(|e| panic!("order {order} {act:?}: {e}"));
                }
                for (order, outer) in [(28 * 512, 4), (4096, 4), (4096, 8), (32768, 4)] {
                    let shape = HadamardShape::clustered(order, outer).unwrap().unwrap();
                    compile_cubin(&source::hadamard(&shape, act).unwrap(), "hadamard.cu", arch)
                        .unwrap_or_else(|e| panic!("cluster order {order} {act:?}: {e}"));
                }
                let cubin = compile_cubin(&source::rope(act), "rope.cu", arch)
                    .unwrap_or_else(|e| panic!("rope {act:?}: {e}"));
                assert!(cubin.windows(5).any(|w| w == b"rope\0"));
            }
        }
        let err = compile_cubin("this is not CUDA", "broken.cu", (9, 0)).unwrap_err();
        assert!(err.to_string().contains("broken.cu"), "{err}");
        // The disk cache returns what was compiled, keyed by content.
        let dir =
            std::env::temp_dir().join(format!("higgs_cuda_cache_test_{}", std::process::id()));
        std::env::set_var("HIGGS_CUDA_CACHE", &dir);
        let src = "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] = 1.f; }";
        let first = cached_cubin(src, "tiny.cu", (9, 0)).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert_eq!(cached_cubin(src, "tiny.cu", (9, 0)).unwrap(), first);
        std::env::remove_var("HIGGS_CUDA_CACHE");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

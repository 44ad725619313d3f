//! Running a split product on the OpenMP team the host process already has (torch's `libgomp`).
//!
//! Why: in a decode step torch's OpenMP workers spin on the other cores between torch ops
//! (GOMP's spin-wait), so a rayon worker woken for a 10–90 µs product competes with a spinning
//! thread for the same core and loses more than it gains. `GOMP_parallel(fn, data, n, 0)`
//! instead hands `fn(data)` to those spinning workers, which pick it up within a microsecond;
//! `omp_get_thread_num()` says which part a thread runs.
//!
//! The library is opened with `RTLD_NOLOAD` ([`OmpTeam::attach`]): only a library that is already
//! loaded is used, and the entry points are looked up *through* it (`dlsym` on its handle searches
//! it and its dependencies): given `libtorch_cpu.so`, that finds the runtime torch itself calls.
//! Which copy matters: a process can hold several (`sentencepiece`, imported by transformers'
//! tokenizers, ships its own renamed `libgomp`), each with its own team, and a team other than
//! torch's adds a second spinning worker per core: SmolLM2 decode fell from ~47 to ~4 tok/s on 2
//! cores when the first `libgomp` in `/proc/self/maps` was taken. LLVM's `libomp` (torch on
//! macOS and ARM) exports the same `GOMP_parallel` entry point; only GNU `libgomp` on Linux is
//! tried here.
//!
//! Panics inside the parallel region are caught on the thread that raised them (unwinding
//! through the C runtime is not allowed) and resumed on the caller once the team has joined.
#![allow(unsafe_code)]

use crate::{HiggsError, Result};
use std::any::Any;
use std::ffi::{c_int, c_uint, c_void, CStr, CString};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
/// `int omp_get_thread_num(void)` and friends.
type OmpQuery = unsafe extern "C" fn() -> c_int;

/// The entry points of a loaded OpenMP runtime. The library is never closed, so the function
/// pointers stay valid for the life of the process.
#[derive(Clone, Copy, Debug)]
pub struct OmpTeam {
    parallel: GompParallel,
    thread_num: OmpQuery,
    num_threads: OmpQuery,
    max_threads: OmpQuery,
}

impl OmpTeam {
    /// The runtime that `path` (an already loaded library: the runtime itself, or one linked
    /// against it, like `libtorch_cpu.so`) resolves the OpenMP entry points to; an error naming
    /// the path if it is not loaded or the symbols are not found through it.
    pub fn attach(path: &Path) -> Result<OmpTeam> {
        Self::open(path, libc::RTLD_NOLOAD | libc::RTLD_LAZY | libc::RTLD_LOCAL)
    }

    /// The runtime at `path`, loading it if needed (for processes without torch: tests, Rust
    /// callers); its team threads are then created on the first parallel region.
    pub fn load(path: &Path) -> Result<OmpTeam> {
        Self::open(path, libc::RTLD_NOW | libc::RTLD_LOCAL)
    }

    fn open(path: &Path, flags: c_int) -> Result<OmpTeam> {
        let name = path.display();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            HiggsError::invalid(format!("the OpenMP library path {name} holds a NUL byte"))
        })?;
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call. Loading a shared
        // library runs its constructors; with RTLD_NOLOAD nothing new is loaded, and `load` is
        // only pointed at OpenMP runtimes, whose constructors only read the environment. The
        // handle is never closed, so symbols resolved from it stay valid.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), flags) };
        if handle.is_null() {
            return Err(HiggsError::Unsupported(format!(
                "the OpenMP runtime {name} is not loaded in this process ({})",
                dl_error()
            )));
        }
        let symbol = |symbol: &CStr| {
            // SAFETY: `handle` came from a successful dlopen and is never closed; `symbol` is
            // NUL-terminated.
            let address = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
            if address.is_null() {
                Err(HiggsError::Unsupported(format!(
                    "{name} has no {} (not an OpenMP runtime with the GNU entry points)",
                    symbol.to_string_lossy()
                )))
            } else {
                Ok(address)
            }
        };
        let parallel = symbol(c"GOMP_parallel")?;
        let queries = [
            symbol(c"omp_get_thread_num")?,
            symbol(c"omp_get_num_threads")?,
            symbol(c"omp_get_max_threads")?,
        ];
        // SAFETY: these are the documented C signatures of the GNU OpenMP ABI (libgomp's
        // `GOMP_parallel` since GCC 4.9, also exported by LLVM's libomp), and the addresses came
        // from dlsym of exactly these names; data and function pointers have the same size and
        // representation on every platform libc's dlsym supports.
        let (parallel, [thread_num, num_threads, max_threads]) = unsafe {
            (
                std::mem::transmute::<*mut c_void, GompParallel>(parallel),
                queries.map(|q| std::mem::transmute::<*mut c_void, OmpQuery>(q)),
            )
        };
        Ok(OmpTeam {
            parallel,
            thread_num,
            num_threads,
            max_threads,
        })
    }

    /// The file the runtime's `GOMP_parallel` lives in (`dladdr`), for messages and checks.
    pub fn library_path(&self) -> Option<std::path::PathBuf> {
        let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
        // SAFETY: `info` is a writable Dl_info; the address is a function inside a loaded (never
        // closed) library. dladdr fills `info` and returns non-zero on success.
        let found = unsafe { libc::dladdr(self.parallel as *const c_void, info.as_mut_ptr()) };
        if found == 0 {
            return None;
        }
        // SAFETY: dladdr succeeded, so `info` is initialized; zeroed memory is a valid Dl_info
        // (null pointers) in any case.
        let info = unsafe { info.assume_init() };
        if info.dli_fname.is_null() {
            return None;
        }
        // SAFETY: non-null dli_fname is a NUL-terminated path owned by the loader, valid while
        // the library stays loaded (forever); it is copied at once.
        let name = unsafe { CStr::from_ptr(info.dli_fname) };
        Some(std::path::PathBuf::from(
            name.to_string_lossy().into_owned(),
        ))
    }

    /// Threads a parallel region started on this thread would get (`omp_get_max_threads`;
    /// torch's `set_num_threads` sets it).
    pub fn max_threads(&self) -> usize {
        // SAFETY: a query without arguments or preconditions, resolved in `open`.
        let n = unsafe { (self.max_threads)() };
        usize::try_from(n).unwrap_or(1).max(1)
    }

    /// Run `work(index, count)` on a team of up to `threads` threads (the calling thread is index
    /// 0) and return once every thread has finished. `count` is the team's real size (the
    /// runtime may give fewer threads, e.g. one inside another parallel region), so `work` must
    /// cover its share of the job for any `count`. A panic in `work` is resumed here. Returns
    /// how long the calling thread worked on its share and how long the whole call took.
    pub fn run(&self, threads: usize, work: &(dyn Fn(usize, usize) + Sync)) -> TeamTiming {
        let job = Job {
            team: self,
            work,
            panic: Mutex::new(None),
            start: Instant::now(),
            caller_done_ns: AtomicU64::new(0),
        };
        let threads = c_uint::try_from(threads.max(1)).unwrap_or(c_uint::MAX);
        // SAFETY: `trampoline` matches the callback type, and `job` outlives the call:
        // GOMP_parallel returns only after every thread of the team has left `trampoline`
        // (the region ends with a barrier), and `trampoline` only reads `job` through a shared
        // reference (its `work` is `Sync`, its panic slot a `Mutex`). flags = 0: no proc_bind.
        unsafe {
            (self.parallel)(
                trampoline,
                &job as *const Job<'_> as *mut c_void,
                threads,
                0,
            )
        };
        let total = job.start.elapsed();
        let panic = job.panic.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(payload) = panic {
            resume_unwind(payload);
        }
        TeamTiming {
            own: Duration::from_nanos(job.caller_done_ns.load(Ordering::Relaxed)),
            total,
        }
    }
}

/// How long [`OmpTeam::run`]'s caller spent on its own share, and on the whole call.
#[derive(Clone, Copy, Debug)]
pub struct TeamTiming {
    pub own: Duration,
    pub total: Duration,
}

struct Job<'a> {
    team: &'a OmpTeam,
    work: &'a (dyn Fn(usize, usize) + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    start: Instant,
    /// When thread 0 (the caller) finished its share, in ns after `start`.
    caller_done_ns: AtomicU64,
}

/// What every thread of the team runs: its share of the job, with panics caught here (they may
/// not unwind into the OpenMP runtime).
extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the `&Job` that `OmpTeam::run` passed to GOMP_parallel, alive until the
    // team has joined (see there); it is only read.
    let job = unsafe { &*(data as *const Job<'_>) };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: queries without preconditions, called inside the parallel region.
        let (index, count) = unsafe { ((job.team.thread_num)(), (job.team.num_threads)()) };
        let count = usize::try_from(count).unwrap_or(1).max(1);
        let index = usize::try_from(index).unwrap_or(0).min(count - 1);
        (job.work)(index, count);
        if index == 0 {
            let ns = u64::try_from(job.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            job.caller_done_ns.store(ns, Ordering::Relaxed);
        }
    }));
    if let Err(payload) = outcome {
        if let Ok(mut slot) = job.panic.lock() {
            slot.get_or_insert(payload);
        }
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call on
    // this thread; it is copied at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "dlopen gave no reason".into()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The process-wide team `LutPlan::run` uses, once attached (the first attach wins: a second,
/// different runtime would have a team of its own).
static TEAM: OnceLock<OmpTeam> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Code bytes × batch rows (or values written) from which work is split over the team.
static MIN_WORK: AtomicUsize = AtomicUsize::new(DEFAULT_MIN_WORK);

/// Below this, the team's hand-off and join (~1.5 µs with torch's workers spinning) cost about
/// what the second thread saves. Measured per call (`CpuLutPlan.forward`, bf16, batch 1, 576
/// wide, 2 threads, in a torch process): 9 KiB of codes 3.6 → 4.2 µs, 18 KiB 4.7 → 4.7,
/// 27 KiB 5.6 → 5.3, 36 KiB 6.8 → 6.0, 54 KiB (SmolLM2's k/v) 9.1 → 7.3, 162 KiB 22.3 → 13.9.
pub const DEFAULT_MIN_WORK: usize = 32 << 10;

/// Use the runtime that `path` (already loaded: the runtime, or a library linked against it)
/// resolves to for the CPU kernels from now on; returns that runtime's file. An error if `path`
/// is not loaded or no entry points are found through it, or if another runtime was attached
/// before.
pub fn install(path: &Path) -> Result<Option<std::path::PathBuf>> {
    let team = OmpTeam::attach(path)?;
    let installed = TEAM.get_or_init(|| team);
    if installed.parallel as usize != team.parallel as usize {
        return Err(HiggsError::invalid(format!(
            "another OpenMP runtime is already attached; {} is a different one",
            path.display()
        )));
    }
    ENABLED.store(true, Ordering::Relaxed);
    Ok(team.library_path())
}

/// Turn the attached team on or off (off: products below the rayon threshold stay on the
/// calling thread, as without a team), and set the work threshold (`None`: unchanged).
pub fn configure(enabled: bool, min_work: Option<usize>) {
    ENABLED.store(enabled, Ordering::Relaxed);
    if let Some(w) = min_work {
        MIN_WORK.store(w, Ordering::Relaxed);
    }
}

/// Whether a team is attached and enabled, and its work threshold.
pub fn settings() -> (bool, usize) {
    (
        TEAM.get().is_some() && ENABLED.load(Ordering::Relaxed),
        MIN_WORK.load(Ordering::Relaxed),
    )
}

static BACKOFF: Backoff = Backoff::new();
const MIN_BACKOFF: usize = 256;
const MAX_BACKOFF: usize = 1 << 16;
/// Waiting for the other threads longer than the caller's own share plus this is a stall.
const STALL_SLACK: Duration = Duration::from_micros(200);

/// The team for a product of `work` (code bytes × batch rows), with the threads it would get,
/// if one is attached, enabled, worth it, has more than one thread and is not backing off.
pub(super) fn for_work(work: usize) -> Option<(&'static OmpTeam, usize)> {
    if !ENABLED.load(Ordering::Relaxed) || work < MIN_WORK.load(Ordering::Relaxed) {
        return None;
    }
    if BACKOFF.skip() {
        return None;
    }
    let team = TEAM.get()?;
    let threads = team.max_threads();
    (threads > 1).then_some((team, threads))
}

/// Back off from the team after a stall (see [`Backoff`]).
pub(super) fn note_timing(timing: TeamTiming) {
    BACKOFF.note(timing);
}

/// Spinning OpenMP workers make each parallel region need all its threads on a core at once:
/// when other processes share the cores, a worker can be descheduled for a whole time slice
/// (~4–8 ms measured here, against 10–60 µs products), and every split call pays it. A call
/// whose caller waited for the others longer than its own share plus `STALL_SLACK` is a stall:
/// the next `next` calls run on the calling thread (doubling per stall in a row, up to
/// `MAX_BACKOFF`; a clean call resets it). Results do not depend on which threads ran them,
/// only the time does. Updates race harmlessly under concurrent callers (a back-off a few calls
/// longer or shorter).
struct Backoff {
    /// Team calls still to be skipped.
    skip: AtomicUsize,
    /// The length of the next back-off.
    next: AtomicUsize,
}

impl Backoff {
    const fn new() -> Backoff {
        Backoff {
            skip: AtomicUsize::new(0),
            next: AtomicUsize::new(MIN_BACKOFF),
        }
    }

    /// Whether this call should skip the team (counting it).
    fn skip(&self) -> bool {
        if self.skip.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.skip.fetch_sub(1, Ordering::Relaxed);
        true
    }

    fn note(&self, timing: TeamTiming) {
        let waited = timing.total.saturating_sub(timing.own);
        if waited > timing.own + STALL_SLACK {
            let backoff = self.next.load(Ordering::Relaxed);
            self.skip.store(backoff, Ordering::Relaxed);
            self.next
                .store((backoff * 2).min(MAX_BACKOFF), Ordering::Relaxed);
        } else {
            self.next.store(MIN_BACKOFF, Ordering::Relaxed);
        }
    }
}

/// The `index`-th of `count` contiguous, near-equal parts of `0..len` (the first `len % count`
/// parts one longer): fixed by `len` and `count` alone.
pub(super) fn part(len: usize, index: usize, count: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / count, len % count);
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// The system's GNU OpenMP runtime, loaded into the test process (torch's copy is tested
    /// from Python, `tests/test_cpu_threads.py`).
    pub(crate) fn system_gomp() -> &'static OmpTeam {
        static SYSTEM: OnceLock<OmpTeam> = OnceLock::new();
        SYSTEM.get_or_init(|| {
            let candidates = [
                "/usr/lib/x86_64-linux-gnu/libgomp.so.1",
                "/usr/lib/aarch64-linux-gnu/libgomp.so.1",
                "/usr/lib64/libgomp.so.1",
                "libgomp.so.1",
            ];
            candidates
                .iter()
                .find_map(|p| OmpTeam::load(Path::new(p)).ok())
                .expect("libgomp.so.1 (GCC's OpenMP runtime) is needed by this test")
        })
    }

    #[test]
    fn stalls_back_off_and_clean_calls_reset() {
        let us = Duration::from_micros;
        let (clean, stall) = (
            TeamTiming {
                own: us(20),
                total: us(25),
            },
            TeamTiming {
                own: us(20),
                total: us(8000),
            },
        );
        let backoff = Backoff::new();
        backoff.note(clean);
        assert!(!backoff.skip());
        backoff.note(stall);
        assert!((0..MIN_BACKOFF).all(|_| backoff.skip()));
        assert!(!backoff.skip());
        backoff.note(stall); // a second stall in a row: twice as long
        assert!((0..2 * MIN_BACKOFF).all(|_| backoff.skip()));
        assert!(!backoff.skip());
        backoff.note(clean);
        backoff.note(stall);
        assert!((0..MIN_BACKOFF).all(|_| backoff.skip()));
        assert!(!backoff.skip());
        for _ in 0..20 {
            backoff.note(stall);
        }
        assert_eq!(backoff.skip.load(Ordering::Relaxed), MAX_BACKOFF);
        // A team that really waits: the caller's share is timed apart from the wait (margins
        // wide enough for a loaded 2-core CI machine, where a thread can lose a time slice).
        let timing = system_gomp().run(2, &|index, count| {
            if count > 1 && index == 1 {
                std::thread::sleep(us(60_000));
            }
        });
        assert!(timing.total >= timing.own);
        if system_gomp().max_threads() > 1 {
            assert!(
                timing.total >= us(60_000) && timing.own < us(40_000),
                "{timing:?}"
            );
        }
    }

    #[test]
    fn parts_cover_the_range_in_order() {
        for len in [0usize, 1, 5, 36, 37, 96] {
            for count in 1..6 {
                let parts: Vec<_> = (0..count).map(|i| part(len, i, count)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[count - 1].end, len);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                assert!(parts
                    .iter()
                    .all(|p| p.len() == len / count || p.len() == len / count + 1));
            }
        }
    }

    #[test]
    fn team_runs_every_index_once() {
        let team = system_gomp();
        for threads in [1usize, 2, 3] {
            let seen = AtomicU64::new(0);
            let count_seen = AtomicUsize::new(0);
            team.run(threads, &|index, count| {
                seen.fetch_or(1 << index, Ordering::Relaxed);
                count_seen.store(count, Ordering::Relaxed);
            });
            let count = count_seen.load(Ordering::Relaxed);
            assert!((1..=threads).contains(&count));
            assert_eq!(seen.load(Ordering::Relaxed), (1u64 << count) - 1);
        }
        assert!(team.max_threads() >= 1);
    }

    #[test]
    fn a_panic_in_the_team_reaches_the_caller() {
        let team = system_gomp();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            team.run(2, &|index, _| {
                if index == 0 {
                    panic!("part {index} failed");
                }
            })
        }));
        let payload = caught.expect_err("the panic must come back");
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert_eq!(message, "part 0 failed");
        // The team still works afterwards.
        let ran = AtomicUsize::new(0);
        team.run(2, &|_, _| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert!(ran.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn the_runtime_names_its_file() {
        let path = system_gomp()
            .library_path()
            .expect("dladdr finds GOMP_parallel");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("libgomp"), "{path:?}");
        // Attaching by that path (loaded now) resolves to the same entry point.
        let again = OmpTeam::attach(&path).unwrap();
        assert_eq!(again.parallel as usize, system_gomp().parallel as usize);
    }

    #[test]
    fn attach_refuses_what_is_not_loaded() {
        let missing = OmpTeam::attach(Path::new("/nonexistent/libgomp.so.1"));
        assert!(matches!(missing, Err(HiggsError::Unsupported(m)) if m.contains("/nonexistent")));
        // libc is loaded but has no GOMP_parallel.
        let not_omp = OmpTeam::attach(Path::new("libc.so.6"));
        assert!(matches!(not_omp, Err(HiggsError::Unsupported(m)) if m.contains("GOMP_parallel")));
    }
}

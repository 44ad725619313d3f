//! Hadamard transform throughput in bytes per second, with a memcpy of the same buffer beside
//! each case (ratio = transform / memcpy throughput). Every available path (avx512, avx2, neon,
//! scalar) is benchmarked by name. `cargo bench --bench hadamard`
//!
//! - `block/*`: one block of `n` f32 in place, again and again (in L1/L2: compute-bound).
//! - `rows/*`: 16 MiB of rows of `n` (past L2, as when quantizing a layer), in place.
//!
//! Time is the CPU time of the benchmarking thread (`CLOCK_THREAD_CPUTIME_ID` on Linux, wall
//! time elsewhere), so other processes on a shared machine do not inflate it.
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use higgs_rs::hadamard;
use higgs_rs::rng::SplitMix64;
use std::hint::black_box;
use std::time::Duration;

const ORDERS: [usize; 7] = [64, 256, 1024, 4096, 576, 1536, 14336];

/// Nanoseconds of CPU time consumed by the calling thread.
#[cfg(target_os = "linux")]
fn thread_cpu_ns() -> u64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec (two 64-bit fields on 64-bit Linux) to a valid,
    // exclusively borrowed struct; the clock id is a Linux constant.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

struct ThreadCpuTime;

struct NanosFormatter;

impl ValueFormatter for NanosFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if ns < 1e3 {
            (1.0, "ns")
        } else if ns < 1e6 {
            (1e-3, "µs")
        } else {
            (1e-6, "ms")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(
        &self,
        _typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let (count, unit) = match *throughput {
            Throughput::Bytes(b) | Throughput::BytesDecimal(b) => (b as f64 / 1e9, "GB/s"),
            Throughput::Bits(b) => (b as f64 / 1e9, "Gbit/s"),
            Throughput::Elements(e) | Throughput::ElementsAndBytes { elements: e, .. } => {
                (e as f64 / 1e9, "Gelem/s")
            }
        };
        values.iter_mut().for_each(|v| *v = count / (*v * 1e-9));
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NanosFormatter
    }
}

fn gaussian(len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    SplitMix64::new(42).fill_gaussian(&mut v);
    v
}

fn bench_case(
    c: &mut Criterion<ThreadCpuTime>,
    group_name: &str,
    len_for: impl Fn(usize) -> usize,
) {
    let mut group = c.benchmark_group(group_name);
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    for order in ORDERS {
        let len = len_for(order);
        group.throughput(Throughput::Bytes((len * 4) as u64));
        let src = gaussian(len);
        let mut dst = vec![0f32; len];
        group.bench_function(BenchmarkId::new("memcpy", order), |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        for path in hadamard::available_paths() {
            let mut data = src.clone();
            group.bench_function(BenchmarkId::new(path.name(), order), |b| {
                b.iter(|| hadamard::forward_with(path, black_box(&mut data), order).unwrap())
            });
        }
    }
    group.finish();
}

fn bench_hadamard(c: &mut Criterion<ThreadCpuTime>) {
    bench_case(c, "block", |order| order);
    // 16 MiB, a whole number of rows.
    bench_case(c, "rows", |order| (4 << 20) / order * order);
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench_hadamard
}
criterion_main!(benches);

//! Nearest-grid-point assignment throughput on Gaussian inputs, in weights (coordinates) per second.
//!
//! `cargo bench --bench assign` measures wall-clock time (criterion's default).
//! `HIGGS_BENCH_CPU_TIME=1 cargo bench --bench assign` measures the benchmark thread's CPU time
//! instead (Linux: `/proc/thread-self/schedstat`), which stays meaningful on a machine shared
//! with other busy processes, where wall-clock time mostly measures the waiting.
#![forbid(unsafe_code)]
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, Criterion, Throughput};
use higgs_rs::assign::Assigner;
use higgs_rs::rng::SplitMix64;
use std::hint::black_box;

fn bench_assign<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("assign");
    for (p, n) in [(1usize, 16usize), (2, 256), (3, 4096), (4, 8192)] {
        let assigner = Assigner::for_grid(p, n).expect("shipped grid");
        // About 2^20 weights (whole tuples): a few rows of a large layer, past the L2 cache.
        let weights = (1 << 20) / p * p;
        let mut xs = vec![0f32; weights];
        SplitMix64::new(42).fill_gaussian(&mut xs);
        let mut codes = vec![0u32; weights / p];
        group.throughput(Throughput::Elements(weights as u64));
        group.bench_function(format!("p{p}_n{n}"), |b| {
            b.iter(|| assigner.assign(black_box(&xs), black_box(&mut codes)))
        });
        group.bench_function(format!("p{p}_n{n}_scalar"), |b| {
            b.iter(|| assigner.assign_scalar(black_box(&xs), black_box(&mut codes)))
        });
    }
    group.finish();
}

/// CPU time of the calling thread, in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat (Linux only; unset HIGGS_BENCH_CPU_TIME elsewhere)")
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NanosecondFormatter
    }
}

struct NanosecondFormatter;

impl ValueFormatter for NanosecondFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns (cpu)")
        } else if typical < 1e6 {
            (1e-3, "µs (cpu)")
        } else {
            (1e-6, "ms (cpu)")
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
        let per_iteration = match throughput {
            Throughput::Elements(count)
            | Throughput::Bytes(count)
            | Throughput::BytesDecimal(count)
            | Throughput::Bits(count)
            | Throughput::ElementsAndBytes {
                elements: count, ..
            } => *count as f64,
        };
        values
            .iter_mut()
            .for_each(|v| *v = per_iteration / *v * 1e3); // per ns → M per s
        "M/s (cpu)"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn main() {
    if std::env::var_os("HIGGS_BENCH_CPU_TIME").is_some() {
        let mut c = Criterion::default()
            .with_measurement(ThreadCpuTime)
            .configure_from_args();
        bench_assign(&mut c);
        c.final_summary();
    } else {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

fn bench_wall(c: &mut Criterion<WallTime>) {
    bench_assign(c);
}

// Not `criterion_main!`: `main` above picks the measurement.
criterion_group!(benches, bench_wall);

//! What the criterion benches share: a CPU-time measurement and the `main` that picks it.
//!
//! CPU time (`HIGGS_BENCH_CPU_TIME=1`, or always for benches that ask for it) is the sum over the
//! process's threads of `/proc/self/task/*/schedstat` (Linux). On a machine shared with other
//! busy processes wall-clock time mostly measures the waiting; CPU time does not. For a
//! single-threaded case it is that thread's time; for a multi-threaded one the sum over threads,
//! so throughputs are per core.
#![forbid(unsafe_code)]
#![allow(dead_code)] // each bench uses part of it

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput};

/// CPU time of the whole process, in nanoseconds.
pub struct ProcessCpuTime;

fn process_cpu_ns() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task (Linux only; measure wall-clock time elsewhere)");
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

impl Measurement for ProcessCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        process_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        process_cpu_ns().saturating_sub(start)
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
        &CpuNanosFormatter
    }
}

struct CpuNanosFormatter;

impl ValueFormatter for CpuNanosFormatter {
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
        // Per ns: bytes/ns is GB/s; elements/ns × 1e3 is millions per second.
        let (per_ns, unit) = match throughput {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) => (*n as f64, "GB/s (cpu)"),
            Throughput::Elements(n)
            | Throughput::Bits(n)
            | Throughput::ElementsAndBytes { elements: n, .. } => (*n as f64 * 1e3, "M/s (cpu)"),
        };
        values.iter_mut().for_each(|v| *v = per_ns / *v);
        unit
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

/// Run `cpu` under CPU time when `HIGGS_BENCH_CPU_TIME` is set, else `wall` under wall-clock
/// time (pass the same generic bench function twice).
pub fn main_picking_measurement(
    cpu: impl FnOnce(&mut Criterion<ProcessCpuTime>),
    wall: impl FnOnce(&mut Criterion<WallTime>),
) {
    if std::env::var_os("HIGGS_BENCH_CPU_TIME").is_some() {
        let mut c = Criterion::default()
            .with_measurement(ProcessCpuTime)
            .configure_from_args();
        cpu(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        wall(&mut c);
        c.final_summary();
    }
}

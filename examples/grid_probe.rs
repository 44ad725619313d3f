use higgs_rs::assign::Assigner;
use higgs_rs::grid::Grid;
use higgs_rs::rng::SplitMix64;
use std::sync::Arc;
fn cpu_ns() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse::<f64>().unwrap()
}
fn main() {
    let t = cpu_ns();
    let w = std::time::Instant::now();
    let mut acc = 1u64;
    for i in 0..200_000_000u64 { acc = std::hint::black_box(acc.wrapping_mul(3).wrapping_add(i)); }
    println!("calib: {:.3} ns per dependent mul+add (cpu), {:.3} wall, {acc}", (cpu_ns() - t) / 2e8, w.elapsed().as_secs_f64() * 1e9 / 2e8);
    let a: Vec<String> = std::env::args().skip(1).collect();
    let p: usize = a[0].parse().unwrap();
    let n: usize = a[1].parse().unwrap();
    let pts: Vec<f32> = if a.len() > 2 {
        let mut v = vec![0f32; n * p];
        SplitMix64::new(77).fill_gaussian(&mut v);
        v.iter().map(|x| x * 0.9).collect()
    } else {
        let bytes = std::fs::read(format!("grids/p{p}_n{n}_v1.bin")).unwrap();
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    let t = std::time::Instant::now();
    let asg = Assigner::new(Arc::new(Grid::from_points(p, pts, 1).unwrap()));
    println!("build {:?} stats {:?}", t.elapsed(), asg.cell_stats());
    if a.len() > 3 { return; }
    let count = 1 << 20;
    let mut xs = vec![0f32; count * p];
    SplitMix64::new(5).fill_gaussian(&mut xs);
    let mut codes = vec![0u32; count];
    let mut codes2 = vec![0u32; count];
    for _ in 0..3 {
        let t = cpu_ns();
        for _ in 0..5 { asg.assign(&xs, &mut codes); }
        let fast = (cpu_ns() - t) * 1e-9 / 5.0;
        let t = cpu_ns();
        for _ in 0..5 { asg.assign_scalar(&xs, &mut codes2); }
        let slow = (cpu_ns() - t) * 1e-9 / 5.0;
        println!("fast {:.2} ns/weight  scalar {:.2} ns/weight  same {}", fast * 1e9 / (count * p) as f64, slow * 1e9 / (count * p) as f64, codes == codes2);
    }
    // same few cells: xs scaled down to a tiny region
    let tiny: Vec<f32> = xs.iter().map(|v| v * 0.01).collect();
    let t = cpu_ns();
    for _ in 0..5 { asg.assign(&tiny, &mut codes); }
    println!("tiny-region fast {:.2} ns/weight", (cpu_ns() - t) / 5.0 / (count * p) as f64);
    let e = asg.assign_with_error(&xs, &mut codes) / (count * p) as f64;
    println!("mse {e:.6}");
}

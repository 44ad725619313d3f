//! Linearity-theorem bit allocation ("dynamic HIGGS").
//!
//! The rise in loss of a quantized model is ≈ Σ_l α_l·t_l² (ARCHITECTURE.md), with t_l² layer l's
//! relative MSE. Given for each layer a list of options (grid, group size, ...), each with an
//! integer cost (stored bits, or latency in fixed units) and a predicted error α_l·t²_{l,k},
//! [`allocate`] picks one option per layer minimizing the summed error with the summed cost
//! within a budget: a multiple-choice knapsack.
//!
//! Method: dynamic programming over the cost axis. Costs are counted above each layer's cheapest
//! option and in units of the greatest common divisor of those excess costs, so the DP is exact
//! (returns an optimum) whenever its table, `layers × (slack / unit + 1)` cells, fits in
//! `max_cells`. Otherwise the unit is coarsened and excess costs are rounded up: the result still
//! respects the budget but may miss the optimum, and `exact` is false unless the LP bound proves
//! it optimal. The LP relaxation (greedy over each layer's lower convex hull) gives a lower bound
//! on the optimum either way, so the gap is always known.
//!
//! [`allocate_two_budgets`] adds a second budget (bits and latency at once) by Lagrangian
//! relaxation of the second one around the exact DP; its answer is feasible, not proven optimal.
#![forbid(unsafe_code)]

use crate::codec::QuantSpec;
use crate::{HiggsError, Result};

/// One option of one layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// What the option costs (stored bits, or latency in integer units).
    pub cost: u64,
    /// Predicted contribution to the loss, α_l·t²: any finite value.
    pub error: f64,
}

/// The chosen option of every layer and what it adds up to.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Index into each layer's option list.
    pub choices: Vec<usize>,
    /// Σ cost of the chosen options (≤ budget).
    pub cost: u64,
    /// Σ error of the chosen options.
    pub error: f64,
    /// A lower bound on the optimal Σ error (LP relaxation, or Lagrangian dual).
    pub lower_bound: f64,
    /// Whether `choices` is proven optimal.
    pub exact: bool,
    /// Cost resolution of the dynamic program (1 = every unit of cost counted).
    pub unit: u64,
}

/// Default limit on the DP table (one byte per cell): 64 MiB.
pub const DEFAULT_MAX_CELLS: usize = 1 << 26;

/// Options a layer may keep after dominated ones are dropped (choice indices are stored as u8).
const MAX_FRONT: usize = 256;

/// Bits a tensor of `rows × cols` stores under `spec`: packed codes (row padding included) and
/// f16 scales, exactly the arrays [`crate::codec::quantize`] writes.
pub fn stored_bits(spec: &QuantSpec, rows: usize, cols: usize) -> Result<u64> {
    let layout = spec.layout(rows, cols)?;
    Ok(layout.rows as u64 * (layout.row_bytes as u64 * 8 + layout.groups as u64 * 16))
}

/// An option that survives dominance: (index in the layer's list, cost above the layer's
/// cheapest option, error).
#[derive(Clone, Copy, Debug)]
struct Kept {
    index: usize,
    excess: u64,
    error: f64,
}

fn validate(layers: &[Vec<Choice>]) -> Result<()> {
    if layers.is_empty() {
        return Err(HiggsError::invalid("allocation needs at least one layer"));
    }
    for (l, options) in layers.iter().enumerate() {
        if options.is_empty() {
            return Err(HiggsError::invalid(format!(
                "layer {l} has no options to choose from"
            )));
        }
        if let Some((k, c)) = options
            .iter()
            .enumerate()
            .find(|(_, c)| !c.error.is_finite())
        {
            return Err(HiggsError::invalid(format!(
                "layer {l}, option {k}: predicted error {} is not finite",
                c.error
            )));
        }
    }
    Ok(())
}

/// Σ of each layer's cheapest cost, or an error on overflow.
fn cheapest_total(layers: &[Vec<Choice>]) -> Result<u64> {
    layers.iter().try_fold(0u64, |sum, options| {
        let cheapest = options.iter().map(|c| c.cost).min().unwrap_or(0);
        sum.checked_add(cheapest)
            .ok_or_else(|| HiggsError::invalid("the summed costs overflow 64 bits"))
    })
}

/// The options of each layer that no other option beats on both cost and error, sorted by cost
/// (so the first has excess 0), leaving out those that alone exceed the slack. Ties keep the
/// lowest index, so the result is deterministic.
fn pareto_fronts(layers: &[Vec<Choice>], slack: u64) -> Result<Vec<Vec<Kept>>> {
    layers
        .iter()
        .enumerate()
        .map(|(l, options)| {
            let cheapest = options.iter().map(|c| c.cost).min().unwrap_or(0);
            let mut order: Vec<usize> = (0..options.len()).collect();
            order.sort_by(|&a, &b| {
                let (ca, cb) = (&options[a], &options[b]);
                ca.cost
                    .cmp(&cb.cost)
                    .then(ca.error.total_cmp(&cb.error))
                    .then(a.cmp(&b))
            });
            let mut front: Vec<Kept> = Vec::new();
            for k in order {
                let c = options[k];
                let excess = c.cost - cheapest;
                if excess > slack {
                    break;
                }
                if front.last().is_none_or(|last| c.error < last.error) {
                    front.push(Kept { index: k, excess, error: c.error });
                }
            }
            if front.len() > MAX_FRONT {
                return Err(HiggsError::invalid(format!(
                    "layer {l} has {} options that are not dominated; at most {MAX_FRONT} are supported",
                    front.len()
                )));
            }
            Ok(front)
        })
        .collect()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The optimum of the LP relaxation: every layer starts at its cheapest option and moves along
/// the segments of its lower convex hull, best error reduction per unit of cost first; the last
/// segment may be taken in part. No integral allocation does better.
fn lp_bound(fronts: &[Vec<Kept>], slack: u64) -> f64 {
    let mut bound: f64 = fronts.iter().map(|f| f[0].error).sum();
    // (slope, cost, error change) of every hull segment; slopes rise along a layer's hull, so
    // sorting all of them keeps each layer's segments in order.
    let mut segments: Vec<(f64, u64, f64)> = Vec::new();
    for front in fronts {
        let mut hull: Vec<Kept> = Vec::new();
        for &point in front {
            while hull.len() >= 2 {
                let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
                // Drop b when it lies on or above the segment from a to the new point.
                let lhs = (b.error - a.error) * (point.excess - a.excess) as f64;
                let rhs = (point.error - a.error) * (b.excess - a.excess) as f64;
                if lhs >= rhs {
                    hull.pop();
                } else {
                    break;
                }
            }
            hull.push(point);
        }
        for pair in hull.windows(2) {
            let cost = pair[1].excess - pair[0].excess;
            let change = pair[1].error - pair[0].error;
            segments.push((change / cost as f64, cost, change));
        }
    }
    segments.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut room = slack;
    for (_, cost, change) in segments {
        if cost <= room {
            bound += change;
            room -= cost;
        } else {
            bound += change * room as f64 / cost as f64;
            break;
        }
    }
    bound
}

/// Choose one option per layer minimizing Σ error with Σ cost ≤ `budget` (see the module docs).
/// `max_cells` bounds the DP table (bytes); [`DEFAULT_MAX_CELLS`] suits models of a few hundred
/// layers at a resolution of a few hundred thousand cost units.
pub fn allocate(layers: &[Vec<Choice>], budget: u64, max_cells: usize) -> Result<Allocation> {
    validate(layers)?;
    let cheapest = cheapest_total(layers)?;
    if cheapest > budget {
        return Err(HiggsError::invalid(format!(
            "the budget {budget} is below the cheapest allocation, {cheapest}; raise the budget or add cheaper options"
        )));
    }
    let slack = budget - cheapest;
    let fronts = pareto_fronts(layers, slack)?;
    let lower_bound = lp_bound(&fronts, slack);

    let common = fronts
        .iter()
        .flatten()
        .fold(0u64, |g, kept| gcd(g, kept.excess));
    let per_layer_cells = (max_cells / layers.len()).max(2) as u64;
    let (unit, exact_grid) = if common == 0 {
        // Every layer keeps only its cheapest option: nothing to spend the slack on.
        (slack.max(1), true)
    } else if slack / common < per_layer_cells {
        (common, true)
    } else {
        // Coarsen: slack / unit must stay below per_layer_cells.
        (slack.div_ceil(per_layer_cells - 1).max(1), false)
    };
    let capacity = (slack / unit) as usize;
    let width = capacity + 1;

    // best[w]: least Σ error of the layers so far with Σ excess units ≤ w.
    let mut best = vec![0f64; width];
    let mut next = vec![0f64; width];
    let mut picks = vec![0u8; layers.len() * width];
    for (l, front) in fronts.iter().enumerate() {
        let row = &mut picks[l * width..(l + 1) * width];
        next.fill(f64::INFINITY);
        for (k, kept) in front.iter().enumerate() {
            let units = kept.excess.div_ceil(unit) as usize;
            if units > capacity {
                continue;
            }
            for w in units..width {
                let candidate = best[w - units] + kept.error;
                if candidate < next[w] {
                    next[w] = candidate;
                    row[w] = k as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
    }

    let mut kept_choice = vec![0usize; layers.len()];
    let mut w = capacity;
    for l in (0..layers.len()).rev() {
        let k = picks[l * width + w] as usize;
        kept_choice[l] = k;
        w -= fronts[l][k].excess.div_ceil(unit) as usize;
    }
    if !exact_grid {
        improve_within_budget(&fronts, &mut kept_choice, slack);
    }

    let choices: Vec<usize> = kept_choice
        .iter()
        .zip(&fronts)
        .map(|(&k, front)| front[k].index)
        .collect();
    let (cost, error) = totals(layers, &choices);
    let proven = error - lower_bound <= 1e-12 * error.abs().max(lower_bound.abs()).max(1e-300);
    Ok(Allocation {
        choices,
        cost,
        error,
        lower_bound: lower_bound.min(error),
        exact: exact_grid || proven,
        unit,
    })
}

/// After a coarse DP: spend what rounding left of the budget, one best single-layer change at a
/// time (the change that lowers the error most among those that fit).
fn improve_within_budget(fronts: &[Vec<Kept>], kept_choice: &mut [usize], slack: u64) {
    let mut spent: u64 = kept_choice
        .iter()
        .zip(fronts)
        .map(|(&k, f)| f[k].excess)
        .sum();
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (l, front) in fronts.iter().enumerate() {
            let current = front[kept_choice[l]];
            for (k, option) in front.iter().enumerate() {
                let gain = current.error - option.error;
                let fits = spent - current.excess + option.excess <= slack;
                if fits && gain > 0.0 && best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, l, k));
                }
            }
        }
        match best {
            Some((_, l, k)) => {
                spent = spent - fronts[l][kept_choice[l]].excess + fronts[l][k].excess;
                kept_choice[l] = k;
            }
            None => return,
        }
    }
}

/// Σ cost and Σ error (in layer order) of a choice of options.
fn totals(layers: &[Vec<Choice>], choices: &[usize]) -> (u64, f64) {
    choices
        .iter()
        .zip(layers)
        .fold((0u64, 0f64), |(c, e), (&k, options)| {
            (c + options[k].cost, e + options[k].error)
        })
}

/// Like [`allocate`], with a second cost per option (`second[l][k]`, e.g. latency) whose sum must
/// also stay within `second_budget`. The second budget is handled by Lagrangian relaxation:
/// minimize Σ (error + λ·second cost) under the first budget by the DP, with λ found by bisection.
/// The result respects both budgets; `exact` is true only when the second budget does not bind
/// (or the dual bound proves optimality); `lower_bound` is the best Lagrangian dual bound found.
pub fn allocate_two_budgets(
    layers: &[Vec<Choice>],
    second: &[Vec<u64>],
    budget: u64,
    second_budget: u64,
    max_cells: usize,
) -> Result<Allocation> {
    validate(layers)?;
    if second.len() != layers.len() || second.iter().zip(layers).any(|(s, o)| s.len() != o.len()) {
        return Err(HiggsError::invalid(
            "the second costs must have one entry per layer and option, like the first",
        ));
    }
    let second_total =
        |choices: &[usize]| -> u64 { choices.iter().zip(second).map(|(&k, s)| s[k]).sum() };
    let with_lambda = |lambda: f64| -> Vec<Vec<Choice>> {
        layers
            .iter()
            .zip(second)
            .map(|(options, s)| {
                options
                    .iter()
                    .zip(s)
                    .map(|(c, &s)| Choice {
                        cost: c.cost,
                        error: c.error + lambda * s as f64,
                    })
                    .collect()
            })
            .collect()
    };
    // Report totals in the original errors.
    let finish = |inner: Allocation, lower_bound: f64, exact: bool| -> Allocation {
        let (cost, error) = totals(layers, &inner.choices);
        Allocation {
            choices: inner.choices,
            cost,
            error,
            lower_bound: lower_bound.min(error),
            exact,
            unit: inner.unit,
        }
    };

    let unconstrained = allocate(layers, budget, max_cells)?;
    if second_total(&unconstrained.choices) <= second_budget {
        let exact = unconstrained.exact;
        let bound = unconstrained.lower_bound;
        return Ok(finish(unconstrained, bound, exact));
    }
    // Does any allocation within the first budget meet the second? Minimize the second cost.
    let fastest: Vec<Vec<Choice>> = layers
        .iter()
        .zip(second)
        .map(|(o, s)| {
            o.iter()
                .zip(s)
                .map(|(c, &s)| Choice {
                    cost: c.cost,
                    error: s as f64,
                })
                .collect()
        })
        .collect();
    let least_second = allocate(&fastest, budget, max_cells)?;
    if second_total(&least_second.choices) > second_budget {
        return Err(HiggsError::invalid(format!(
            "no allocation within the first budget meets the second budget {second_budget}: the least found is {}",
            second_total(&least_second.choices)
        )));
    }

    let mut lower_bound = unconstrained.lower_bound;
    let mut consider = |lambda: f64| -> Result<Allocation> {
        let inner = allocate(&with_lambda(lambda), budget, max_cells)?;
        let dual = if inner.exact {
            inner.error
        } else {
            inner.lower_bound
        };
        lower_bound = lower_bound.max(dual - lambda * second_budget as f64);
        Ok(inner)
    };
    // λ in units of (error spread) / (second-cost spread), doubled until the second budget holds.
    let error_spread: f64 = layers
        .iter()
        .map(|o| {
            let (lo, hi) = o
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| {
                    (lo.min(c.error), hi.max(c.error))
                });
            hi - lo
        })
        .sum();
    let cost_spread: u64 = second
        .iter()
        .map(|s| s.iter().max().unwrap_or(&0) - s.iter().min().unwrap_or(&0))
        .sum();
    let mut high = (error_spread / cost_spread.max(1) as f64).max(f64::MIN_POSITIVE);
    let mut feasible: Option<Allocation> = None;
    for _ in 0..200 {
        let inner = consider(high)?;
        if second_total(&inner.choices) <= second_budget {
            feasible = Some(inner);
            break;
        }
        high *= 2.0;
    }
    let mut feasible = match feasible {
        Some(f) => f,
        // Any λ large enough ranks by second cost first; fall back to the least-second allocation.
        None => least_second,
    };
    let mut low = 0.0;
    for _ in 0..60 {
        let mid = 0.5 * (low + high);
        let inner = consider(mid)?;
        if second_total(&inner.choices) <= second_budget {
            high = mid;
            let (_, e_new) = totals(layers, &inner.choices);
            let (_, e_old) = totals(layers, &feasible.choices);
            if e_new < e_old {
                feasible = inner;
            }
        } else {
            low = mid;
        }
    }
    let (_, error) = totals(layers, &feasible.choices);
    let proven = error - lower_bound <= 1e-12 * error.abs().max(lower_bound.abs()).max(1e-300);
    Ok(finish(feasible, lower_bound, proven))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Every combination of options: the optimum (error, cost) within the budget, if any.
    fn brute_force(
        layers: &[Vec<Choice>],
        budget: u64,
        second: Option<(&[Vec<u64>], u64)>,
    ) -> Option<f64> {
        let mut index = vec![0usize; layers.len()];
        let mut best: Option<f64> = None;
        loop {
            let (cost, error) = totals(layers, &index);
            let second_ok = second
                .is_none_or(|(s, b)| index.iter().zip(s).map(|(&k, s)| s[k]).sum::<u64>() <= b);
            if cost <= budget && second_ok && best.is_none_or(|b| error < b) {
                best = Some(error);
            }
            let mut l = 0;
            loop {
                if l == layers.len() {
                    return best;
                }
                index[l] += 1;
                if index[l] < layers[l].len() {
                    break;
                }
                index[l] = 0;
                l += 1;
            }
        }
    }

    fn random_instance(
        rng: &mut SplitMix64,
        max_layers: u64,
        max_options: u64,
        cost_scale: u64,
    ) -> Vec<Vec<Choice>> {
        let layers = 1 + rng.next_u64() % max_layers;
        (0..layers)
            .map(|_| {
                let options = 1 + rng.next_u64() % max_options;
                (0..options)
                    .map(|_| Choice {
                        cost: cost_scale * (1 + rng.next_u64() % 20),
                        error: rng.next_f64() * 10.0 - 1.0,
                    })
                    .collect()
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn exact_dp_matches_brute_force() {
        let mut rng = SplitMix64::new(7);
        for case in 0..400 {
            let scale = [1, 3, 1536][case % 3];
            let layers = random_instance(&mut rng, 6, 5, scale);
            let cheapest: u64 = layers
                .iter()
                .map(|o| o.iter().map(|c| c.cost).min().unwrap())
                .sum();
            let dearest: u64 = layers
                .iter()
                .map(|o| o.iter().map(|c| c.cost).max().unwrap())
                .sum();
            let budget = cheapest + rng.next_u64() % (dearest - cheapest + 2);
            let got = allocate(&layers, budget, DEFAULT_MAX_CELLS).unwrap();
            let want = brute_force(&layers, budget, None).unwrap();
            assert!(got.exact, "case {case}");
            assert!(
                got.cost <= budget,
                "case {case}: cost {} > budget {budget}",
                got.cost
            );
            assert!(
                close(got.error, want),
                "case {case}: {} vs brute force {want}",
                got.error
            );
            assert!(
                got.lower_bound <= want + 1e-9,
                "case {case}: bound {} above optimum {want}",
                got.lower_bound
            );
            assert_eq!(totals(&layers, &got.choices), (got.cost, got.error));
        }
    }

    #[test]
    fn coarse_dp_stays_within_budget_and_bounds_hold() {
        let mut rng = SplitMix64::new(11);
        let mut gaps = 0.0;
        for case in 0..300 {
            let layers = random_instance(&mut rng, 7, 5, 1);
            let cheapest: u64 = layers
                .iter()
                .map(|o| o.iter().map(|c| c.cost).min().unwrap())
                .sum();
            let budget = cheapest + rng.next_u64() % 60;
            // Two cells per layer force a coarse cost axis.
            let got = allocate(&layers, budget, 2 * layers.len()).unwrap();
            let want = brute_force(&layers, budget, None).unwrap();
            assert!(got.cost <= budget, "case {case}");
            assert!(
                got.error >= want - 1e-9,
                "case {case}: better than the optimum?"
            );
            assert!(got.lower_bound <= want + 1e-9, "case {case}");
            if got.exact {
                assert!(close(got.error, want), "case {case}: claimed exact");
            }
            gaps += got.error - want;
        }
        // Coarse but not useless: the greedy repair keeps it close to the optimum on average.
        assert!(gaps / 300.0 < 1.0, "mean gap {}", gaps / 300.0);
    }

    #[test]
    fn budget_below_cheapest_is_an_error() {
        let layers = vec![
            vec![Choice {
                cost: 5,
                error: 1.0,
            }],
            vec![
                Choice {
                    cost: 7,
                    error: 0.0,
                },
                Choice {
                    cost: 9,
                    error: -1.0,
                },
            ],
        ];
        let err = allocate(&layers, 11, DEFAULT_MAX_CELLS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("below the cheapest allocation, 12"), "{err}");
        assert!(allocate(&[], 10, DEFAULT_MAX_CELLS).is_err());
        assert!(allocate(&[vec![]], 10, DEFAULT_MAX_CELLS).is_err());
        let nan = vec![vec![Choice {
            cost: 1,
            error: f64::NAN,
        }]];
        assert!(allocate(&nan, 10, DEFAULT_MAX_CELLS)
            .unwrap_err()
            .to_string()
            .contains("layer 0, option 0"));
    }

    #[test]
    fn dominated_options_leave_a_tiny_table() {
        // Dearer options that are also worse: the slack buys nothing, and no huge table is built.
        let layers: Vec<Vec<Choice>> = (0..50)
            .map(|_| {
                vec![
                    Choice {
                        cost: 10,
                        error: 1.0,
                    },
                    Choice {
                        cost: 1 << 40,
                        error: 2.0,
                    },
                ]
            })
            .collect();
        let got = allocate(&layers, u64::MAX / 2, DEFAULT_MAX_CELLS).unwrap();
        assert!(got.exact);
        assert_eq!(got.choices, vec![0; 50]);
        assert_eq!(got.cost, 500);
    }

    #[test]
    fn spends_budget_where_error_drops_most() {
        // Two layers with the same options; layer 1 is ten times as sensitive: it gets the bits.
        let options = |alpha: f64| -> Vec<Choice> {
            [(3u64, 0.04), (4, 0.01), (5, 0.0025)]
                .iter()
                .map(|&(bits, t2)| Choice {
                    cost: bits * 1000,
                    error: alpha * t2,
                })
                .collect()
        };
        let layers = vec![options(1.0), options(10.0)];
        let got = allocate(&layers, 8000, DEFAULT_MAX_CELLS).unwrap();
        assert_eq!(got.choices, vec![0, 2]);
        assert_eq!(got.cost, 8000);
        assert_eq!(got.unit, 1000);
    }

    #[test]
    fn two_budgets_are_both_respected() {
        let mut rng = SplitMix64::new(23);
        let mut exact_hits = 0;
        for case in 0..200 {
            let layers = random_instance(&mut rng, 5, 4, 1);
            let second: Vec<Vec<u64>> = layers
                .iter()
                .map(|o| o.iter().map(|_| 1 + rng.next_u64() % 30).collect())
                .collect();
            let cheapest: u64 = layers
                .iter()
                .map(|o| o.iter().map(|c| c.cost).min().unwrap())
                .sum();
            let budget = cheapest + rng.next_u64() % 40;
            let second_budget =
                second.iter().map(|s| *s.iter().min().unwrap()).sum::<u64>() + rng.next_u64() % 40;
            let want = brute_force(&layers, budget, Some((&second, second_budget)));
            match allocate_two_budgets(&layers, &second, budget, second_budget, DEFAULT_MAX_CELLS) {
                Ok(got) => {
                    let want = want.expect("found an allocation where none exists");
                    let used: u64 = got.choices.iter().zip(&second).map(|(&k, s)| s[k]).sum();
                    assert!(got.cost <= budget && used <= second_budget, "case {case}");
                    assert!(
                        got.error >= want - 1e-9 && got.lower_bound <= want + 1e-9,
                        "case {case}"
                    );
                    if got.exact {
                        assert!(close(got.error, want), "case {case}: claimed exact");
                    }
                    exact_hits += close(got.error, want) as usize;
                }
                Err(err) => {
                    assert!(
                        want.is_none(),
                        "case {case}: {err}, but brute force finds {want:?}"
                    );
                }
            }
        }
        // Lagrangian relaxation finds the optimum on most small instances.
        assert!(exact_hits > 120, "{exact_hits} of 200 optimal");
    }

    #[test]
    fn stored_bits_counts_codes_and_scales() {
        let spec = QuantSpec {
            p: 2,
            n: 256,
            hadamard_size: None,
            group_size: 64,
            seed: Some(0),
        };
        // 576 columns: 288 codes of 8 bits and 9 scales of 16 bits per row: 4.25 bits per weight.
        assert_eq!(
            stored_bits(&spec, 10, 576).unwrap(),
            10 * (288 * 8 + 9 * 16)
        );
        let p4 = QuantSpec {
            p: 4,
            n: 8192,
            hadamard_size: None,
            group_size: 64,
            seed: None,
        };
        // 144 codes of 13 bits = 1872 bits = 234 bytes.
        assert_eq!(stored_bits(&p4, 3, 576).unwrap(), 3 * (234 * 8 + 9 * 16));
        assert!(stored_bits(&spec, 0, 576).is_err());
    }
}

//! Adam in one pass over each parameter on the CPU (`flex`) backend.
//!
//! Burn 0.22.1's `Adam` runs about a dozen tensor operations per parameter (each a full pass
//! over the parameter, most allocating), 21 ms of a 290 ms ResNet-18 step at batch 64 x 64 on
//! two cores. [`FusedAdam`] computes the same formulas, in the same order and in f32, in one
//! pass (so its results equal Burn's bit for bit) and keeps Burn's `AdamState`, so optimizer
//! checkpoints are unchanged. Parameters off the flex device or not in f32 take Burn's `Adam`.

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

use crate::flex::{dispatch_simd, f32_contiguous, f32_tensor};

/// One fused Adam update as a backend operation.
#[backend_extension(Flex)]
pub trait FusedAdamStep: Backend {
    /// `(parameter, first moment, second moment)` after one step.
    /// `factors` = `[lr, β1, β2, combined, ε·√(1 − β2ᵗ)]` (see [`FusedAdam`]).
    fn fused_adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        factors: [f32; 5],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The first step, from zero moments.
    fn fused_adam_first_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        factors: [f32; 5],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Elements per rayon task.
const TASK: usize = 1 << 15;

/// The update of one element: `(parameter, m, v)` after the step, in Burn's order of
/// operations (`m·β1 + g·(1 − β1)`, `v·β2 + g²·(1 − β2)`, `p − (m·c / (√v + ε')) · lr`).
#[inline(always)]
fn update_one(p: f32, g: f32, m: f32, v: f32, [lr, b1, b2, combined, eps]: [f32; 5]) -> [f32; 3] {
    let m = m * b1 + g * (1.0 - b1);
    let v = v * b2 + (g * g) * (1.0 - b2);
    [p - (m * combined) / (v.sqrt() + eps) * lr, m, v]
}

/// The update of one run of elements; `m` and `v` are empty on the first step (zero).
#[inline(always)]
fn update([p, g, m, v]: [&[f32]; 4], [po, mo, vo]: [&mut [f32]; 3], f: [f32; 5]) {
    let outs = po.iter_mut().zip(mo.iter_mut()).zip(vo.iter_mut());
    if m.is_empty() {
        for (((po, mo), vo), (&p, &g)) in outs.zip(p.iter().zip(g)) {
            [*po, *mo, *vo] = update_one(p, g, 0.0, 0.0, f);
        }
    } else {
        let ins = p.iter().zip(g).zip(m).zip(v);
        for (((po, mo), vo), (((&p, &g), &m), &v)) in outs.zip(ins) {
            [*po, *mo, *vo] = update_one(p, g, m, v, f);
        }
    }
}

dispatch_simd!(update_simd(inputs: [&[f32]; 4], outputs: [&mut [f32]; 3], factors: [f32; 5]) => update(inputs, outputs, factors));

/// One step over flex tensors; `moments` are absent on the first step.
fn flex_step(
    param: &FlexTensor,
    grad: &FlexTensor,
    moments: Option<(&FlexTensor, &FlexTensor)>,
    factors: [f32; 5],
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = param.layout().shape().clone();
    let (param, grad) = (f32_contiguous(param), f32_contiguous(grad));
    let moments = moments.map(|(m, v)| (f32_contiguous(m), f32_contiguous(v)));
    let (p, g) = (param.storage::<f32>(), grad.storage::<f32>());
    let (m, v) = match &moments {
        Some((m, v)) => (m.storage::<f32>(), v.storage::<f32>()),
        None => (&[][..], &[][..]),
    };
    let n = p.len();
    assert_eq!(n, g.len(), "Adam: parameter and gradient sizes differ");
    assert!(
        m.is_empty() || (m.len() == n && v.len() == n),
        "Adam: state size differs"
    );
    let (mut p_out, mut m_out, mut v_out) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    p_out
        .par_chunks_mut(TASK)
        .zip(m_out.par_chunks_mut(TASK))
        .zip(v_out.par_chunks_mut(TASK))
        .enumerate()
        .for_each(|(t, ((po, mo), vo))| {
            let range = t * TASK..t * TASK + po.len();
            let (mi, vi) = if m.is_empty() {
                (&[][..], &[][..])
            } else {
                (&m[range.clone()], &v[range.clone()])
            };
            update_simd(
                [&p[range.clone()], &g[range], mi, vi],
                [po, mo, vo],
                factors,
            );
        });
    (
        f32_tensor(p_out, shape.clone()),
        f32_tensor(m_out, shape.clone()),
        f32_tensor(v_out, shape),
    )
}

/// Whether `t` owns all of its f32 storage alone (so it can be updated in place).
fn owns_whole_storage(t: &FlexTensor) -> bool {
    t.dtype() == burn::tensor::DType::F32
        && t.is_unique()
        && t.layout().contiguous_offsets() == Some((0, t.storage::<f32>().len()))
}

/// The update of one run of elements in place.
#[inline(always)]
fn update_in_place(g: &[f32], [p, m, v]: [&mut [f32]; 3], f: [f32; 5]) {
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        [*p, *m, *v] = update_one(*p, g, *m, *v, f);
    }
}

dispatch_simd!(update_in_place_simd(g: &[f32], state: [&mut [f32]; 3], factors: [f32; 5]) => update_in_place(g, state, factors));

impl FusedAdamStep for Flex {
    fn fused_adam_step(
        mut param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mut moment_1: FloatTensor<Self>,
        mut moment_2: FloatTensor<Self>,
        factors: [f32; 5],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let n = param.layout().shape().num_elements();
        let in_place = [&param, &moment_1, &moment_2]
            .iter()
            .all(|t| owns_whole_storage(t) && t.storage::<f32>().len() == n);
        if !in_place {
            return flex_step(&param, &grad, Some((&moment_1, &moment_2)), factors);
        }
        // The usual case: the optimizer holds the only reference to each tensor, so the step
        // rewrites them where they are (no allocation, one read and one write of each).
        let grad = f32_contiguous(&grad);
        let g = grad.storage::<f32>();
        assert_eq!(g.len(), n, "Adam: parameter and gradient sizes differ");
        let unique = "checked by owns_whole_storage";
        let p = param.try_storage_mut::<f32>().expect(unique);
        let m = moment_1.try_storage_mut::<f32>().expect(unique);
        let v = moment_2.try_storage_mut::<f32>().expect(unique);
        p.par_chunks_mut(TASK)
            .zip(m.par_chunks_mut(TASK))
            .zip(v.par_chunks_mut(TASK))
            .zip(g.par_chunks(TASK))
            .for_each(|(((p, m), v), g)| update_in_place_simd(g, [p, m, v], factors));
        (param, moment_1, moment_2)
    }

    fn fused_adam_first_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        factors: [f32; 5],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        flex_step(&param, &grad, None, factors)
    }
}

/// Adam (no weight decay, no AMSGrad) with Burn's formulas and state, fused on the CPU.
#[derive(Clone)]
pub struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    /// Burn's own Adam with the same settings, for tensors the fused kernel does not take.
    fallback: Adam,
}

impl FusedAdam {
    /// PyTorch's and Burn's betas (0.9, 0.999) with the given epsilon.
    pub fn new(epsilon: f32) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon,
            fallback: AdamConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.999)
                .with_epsilon(epsilon)
                .build(),
        }
    }

    /// The whole-module optimizer (what `AdamConfig::init` returns for Burn's Adam).
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let fused = crate::flex::is_flex_f32(&tensor)
            && crate::flex::is_flex_f32(&grad)
            && state
                .as_ref()
                .is_none_or(|s| s.momentum.max_moment_2.is_none());
        if !fused {
            return self.fallback.step(lr, tensor, grad, state);
        }
        let (time, m, v) = match state {
            Some(s) => (
                s.momentum.time + 1,
                Some(s.momentum.moment_1),
                Some(s.momentum.moment_2),
            ),
            None => (1, None, None),
        };
        // Burn's scalars, computed as Burn does (in f32).
        let t = time as i32;
        let bias_correction2_sqrt = (1.0 - self.beta_2.powi(t)).sqrt();
        let combined = bias_correction2_sqrt / (1.0 - self.beta_1.powi(t));
        let factors = [
            lr as f32,
            self.beta_1,
            self.beta_2,
            combined,
            self.epsilon * bias_correction2_sqrt,
        ];
        let (p, m, v) = match (m, v) {
            (Some(m), Some(v)) => <Dispatch as FusedAdamStep>::fused_adam_step(
                tensor.into_dispatch(),
                grad.into_dispatch(),
                m.into_dispatch(),
                v.into_dispatch(),
                factors,
            ),
            _ => <Dispatch as FusedAdamStep>::fused_adam_first_step(
                tensor.into_dispatch(),
                grad.into_dispatch(),
                factors,
            ),
        };
        let momentum =
            AdaptiveMomentumState::new(time, Tensor::from_dispatch(m), Tensor::from_dispatch(v));
        (Tensor::from_dispatch(p), Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <Adam as Optimizer>::to_device(state, device)
    }
}

//! The inference path of a finished network on the CPU: the graph `kd export` writes (BatchNorm
//! folded into the convolutions) compiled into NHWC kernels, each convolution fused with its
//! bias, residual addition and activation, no autodiff bookkeeping, and buffers that live
//! from one batch to the next. `kd predict` and `kd bench --mode eval` use it for f32 on the
//! CPU; a network with a layer it does not cover (CoAtNet's attention) keeps Burn's forward.
//! A batch of one, or any batch on one thread, runs each step across the threads; a larger
//! batch on several threads runs in chunks of images, one worker per thread, each with its
//! own buffers (`Plan::chunk`).
//!
//! The kernels work on plain slices rather than as Burn operations so that a value can be
//! written into a buffer that a dead one left (a Burn operation allocates its output); their
//! parity with Burn's operations is tested in `tests.rs`, and the plan's logits against the
//! network's forward for every CNN family (`check_inference_plan` in the integration tests).

mod aligned;
mod compile;
mod conv;
mod depthwise;
mod direct;
mod narrow;
mod pointwise;
mod pool;
mod rows;
mod window;
mod winograd;

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, ensure};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::models::Network;
use crate::models::onnx::Graph;
use crate::ops::{Ctx, Precision};
use aligned::Aligned;
use compile::{Op, Program};

/// Weights up to this size stay in a typical last-level cache, so that images run in
/// parallel in small chunks (each chunk reads all the weights) cost little: 32 MiB.
const CACHED_WEIGHTS: usize = 32 << 20;

/// A network compiled for inference, with its buffers.
pub struct Plan {
    program: Program,
    /// One per worker of a batch run in chunks of images; the first runs whole batches.
    workers: Vec<Worker>,
    /// The logits of a batch run in chunks.
    logits: Vec<f32>,
    /// Runs since profiling began; `None` without profiling.
    runs: Option<usize>,
    /// Most workers of a profiled run.
    profiled_workers: usize,
}

/// The buffers of one worker, and with profiling the seconds spent in each step.
#[derive(Default)]
struct Worker {
    buffers: Vec<Aligned>,
    times: Vec<f64>,
}

/// Where the time of a [`Plan`]'s runs went (`kd bench --profile`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    /// Workers that ran a batch's images in parallel chunks; 1 where each step was split
    /// across the threads instead. With several, a step's time adds up the workers' (thread
    /// time, not wall time), and a worker that waits inside a step may run part of another
    /// worker's step meanwhile.
    pub workers: usize,
    /// Each step's mean time per run, the input's conversion to NHWC first.
    pub steps: Vec<StepTime>,
}

/// Mean time of one step of a [`Plan`] per run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepTime {
    /// What the step computes: its operation, shapes and fused activation.
    pub step: String,
    /// Seconds per run.
    pub seconds: f64,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plan({} steps)", self.program.steps.len())
    }
}

/// Whether [`Plan`] serves `device` in `precision` (f32 on the CPU backend).
pub fn applies(device: &Device, precision: Precision) -> bool {
    precision == Precision::F32 && crate::ops::flex::is_flex_device(device)
}

impl Plan {
    /// `net` for images of side `size`; an error names the layer the plan does not cover.
    pub fn new(net: &Network, size: usize) -> Result<Self> {
        let mut g = Graph::default();
        let logits = net.to_onnx(&mut g, "images".into(), size)?;
        let program = compile::compile(&g, "images", &logits, size)?;
        Ok(Self {
            workers: Vec::new(),
            logits: Vec::new(),
            program,
            runs: None,
            profiled_workers: 0,
        })
    }

    /// Times every step of the runs from now on (a clock read per step).
    pub fn profile_steps(&mut self) {
        self.runs = Some(0);
        self.profiled_workers = 0;
        for w in &mut self.workers {
            w.times.fill(0.0);
        }
    }

    /// The mean time of each step per run since [`Plan::profile_steps`].
    pub fn profile(&self) -> Option<Profile> {
        let runs = self.runs?.max(1) as f64;
        let [h, w, c] = self.program.input_shape;
        let names = std::iter::once(format!("input NCHW->NHWC {c} {h}x{w}"))
            .chain(self.program.steps.iter().map(compile::Step::describe));
        let steps = names
            .enumerate()
            .map(|(s, step)| StepTime {
                step,
                seconds: self
                    .workers
                    .iter()
                    .filter_map(|w| w.times.get(s))
                    .sum::<f64>()
                    / runs,
            })
            .collect();
        Some(Profile {
            workers: self.profiled_workers.max(1),
            steps,
        })
    }

    /// Images per chunk of a batch of `batch` on `threads` threads, or `None` to run the
    /// batch whole (its steps split across the threads). In chunks, each worker runs its
    /// images through every step without waiting for the others, and a chunk's values
    /// stay in cache where a whole batch's would not; each chunk reads all the weights,
    /// so two chunks per thread where the weights stay cached, else one.
    fn chunk(&self, batch: usize, threads: usize) -> Option<usize> {
        if threads < 2 || batch < 2 {
            return None;
        }
        let per_thread = batch.div_ceil(threads);
        Some(if self.program.weight_bytes <= CACHED_WEIGHTS {
            per_thread.div_ceil(2)
        } else {
            per_thread
        })
    }

    /// The logits per image.
    pub fn classes(&self) -> usize {
        self.program.classes
    }

    /// Logits `[batch, classes]` (row-major) of `images [batch, 3, size, size]` (NCHW,
    /// normalized).
    pub fn run(&mut self, images: &[f32], batch: usize) -> &[f32] {
        let [h, w, c] = self.program.input_shape;
        assert_eq!(
            images.len(),
            batch * c * h * w,
            "images of the planned size"
        );
        let classes = self.program.classes;
        if let Some(runs) = self.runs.as_mut() {
            *runs += 1;
        }
        let threads = rayon::current_num_threads();
        let chunk = self.chunk(batch, threads);
        let workers = chunk.map_or(1, |chunk| threads.min(batch.div_ceil(chunk)));
        let profiling = self.runs.is_some();
        if profiling {
            self.profiled_workers = self.profiled_workers.max(workers);
        }
        while self.workers.len() < workers {
            self.workers.push(Worker::default());
        }
        for w in &mut self.workers[..workers] {
            w.buffers
                .resize_with(self.program.buffers, Aligned::default);
            if profiling {
                w.times.resize(self.program.steps.len() + 1, 0.0);
            }
        }
        let program = &self.program;
        let Some(chunk) = chunk else {
            let w = &mut self.workers[0];
            let times = profiling.then_some(w.times.as_mut_slice());
            Self::execute(program, &mut w.buffers, images, batch, times);
            return &w.buffers[program.output][..batch * classes];
        };
        // Workers take the next chunk until none is left.
        self.logits.resize(batch * classes, 0.0);
        let logits = std::sync::Mutex::new(&mut self.logits);
        let next = AtomicUsize::new(0);
        let per_image = c * h * w;
        self.workers[..workers].par_iter_mut().for_each(|w| {
            loop {
                let first = next.fetch_add(chunk, Ordering::Relaxed);
                if first >= batch {
                    break;
                }
                let n = chunk.min(batch - first);
                let images = &images[first * per_image..(first + n) * per_image];
                let times = profiling.then_some(w.times.as_mut_slice());
                Self::execute(program, &mut w.buffers, images, n, times);
                let out = &w.buffers[program.output][..n * classes];
                let mut logits = logits.lock().unwrap_or_else(|e| e.into_inner());
                logits[first * classes..(first + n) * classes].copy_from_slice(out);
            }
        });
        &self.logits[..batch * classes]
    }

    /// The steps of `program` on `images`, into `buffers`; each step's seconds added to
    /// `times` when given (the input's conversion first).
    fn execute(
        program: &Program,
        buffers: &mut [Aligned],
        images: &[f32],
        batch: usize,
        mut times: Option<&mut [f64]>,
    ) {
        let [h, w, c] = program.input_shape;
        if batch == 0 {
            return;
        }
        let start = times.is_some().then(std::time::Instant::now);
        to_nhwc(
            images,
            [c, h * w],
            buffers[program.input].grown(images.len()),
        );
        if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
            times[0] += start.elapsed().as_secs_f64();
        }
        for (s, step) in program.steps.iter().enumerate() {
            let start = times.is_some().then(std::time::Instant::now);
            let [oh, ow, oc] = step.output_shape;
            let [ih, iw, ic] = step.input_shape;
            let mut buffer = std::mem::take(&mut buffers[step.output]);
            let out = buffer.grown(batch * oh * ow * oc);
            let input = |i: usize| -> &[f32] {
                let [h, w, c] = if i == 0 {
                    step.input_shape
                } else {
                    step.output_shape
                };
                &buffers[step.inputs[i]][..batch * h * w * c]
            };
            match &step.op {
                Op::Conv(conv) => {
                    let residual = (step.inputs.len() > 1).then(|| input(1));
                    conv.run(input(0), [batch, ih, iw], residual, out);
                }
                Op::Depthwise(conv) => conv.run(input(0), [batch, ih, iw], out),
                Op::MaxPool(pool) => pool.run(input(0), [batch, ih, iw, ic], out),
                Op::GlobalAvgPool => pool::global_avg_pool(input(0), [ih * iw, ic], out),
                Op::Act(act) => {
                    out.copy_from_slice(input(0));
                    act.apply_par(out);
                }
                Op::Add(act) => pointwise::add(input(0), input(1), *act, out),
                Op::ScaleChannels => {
                    let scale = &buffers[step.inputs[1]][..batch * oc];
                    pointwise::scale_channels(input(0), scale, (ih * iw, ic), out);
                }
            }
            buffers[step.output] = buffer;
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                times[s + 1] += start.elapsed().as_secs_f64();
            }
        }
    }

    /// [`Plan::run`] on a tensor: logits `[batch, classes]` on the tensor's device.
    pub fn forward(&mut self, x: Tensor<4>) -> Result<Tensor<2>> {
        let [b, c, h, w] = x.dims();
        let [ph, pw, pc] = self.program.input_shape;
        ensure!(
            [c, h, w] == [pc, ph, pw],
            "the plan takes [N, {pc}, {ph}, {pw}] images, not {:?}",
            x.dims()
        );
        let device = x.device();
        let data = crate::models::onnx::floats(x)?;
        let logits = self.run(&data, b).to_vec();
        Ok(Tensor::from_data(
            TensorData::new(logits, [b, self.program.classes]),
            &device,
        ))
    }
}

/// `x [b, c, pixels]` (NCHW) as `out [b, pixels, c]` (NHWC), in blocks of pixels across
/// the threads.
fn to_nhwc(x: &[f32], [c, pixels]: [usize; 2], out: &mut [f32]) {
    /// Pixels per task.
    const BLOCK: usize = 4096;
    out.par_chunks_mut(c * pixels)
        .zip(x.par_chunks(c * pixels))
        .for_each(|(out, x)| {
            out.par_chunks_mut(c * BLOCK)
                .enumerate()
                .for_each(|(block, out)| {
                    let p0 = block * BLOCK;
                    match c {
                        3 => pixels_to_nhwc::<3>(x, pixels, p0, out),
                        _ => {
                            for (p, out) in out.chunks_exact_mut(c).enumerate() {
                                for (ch, o) in out.iter_mut().enumerate() {
                                    *o = x[ch * pixels + p0 + p];
                                }
                            }
                        }
                    }
                });
        });
}

/// [`to_nhwc`] of the pixels from `p0` of one image of `C` channels.
fn pixels_to_nhwc<const C: usize>(x: &[f32], pixels: usize, p0: usize, out: &mut [f32]) {
    let n = out.len() / C;
    let planes: [&[f32]; C] = std::array::from_fn(|ch| &x[ch * pixels + p0..][..n]);
    for (p, out) in out.chunks_exact_mut(C).enumerate() {
        for (o, plane) in out.iter_mut().zip(&planes) {
            *o = plane[p];
        }
    }
}

/// A finished network's logits: through its [`Plan`] where one applies (f32 on the CPU, a
/// network it covers), else through the network's forward.
pub struct Inference {
    net: Network,
    plan: Option<Plan>,
    cx: Ctx,
}

impl Inference {
    /// `net` for images of side `size` on `device` in `precision`.
    pub fn new(net: Network, size: usize, device: &Device, precision: Precision) -> Self {
        let plan = applies(device, precision)
            .then(|| Plan::new(&net, size).ok())
            .flatten();
        Self {
            net,
            plan,
            cx: Ctx::new(precision),
        }
    }

    /// Whether the logits come from kd's plan.
    pub fn uses_plan(&self) -> bool {
        self.plan.is_some()
    }

    /// Logits `[batch, classes]` of normalized images `[batch, 3, size, size]`.
    pub fn logits(&mut self, x: Tensor<4>) -> Result<Tensor<2>> {
        match self.plan.as_mut() {
            Some(plan) => plan.forward(x),
            None => Ok(self.net.forward(x, &self.cx)),
        }
    }
}

#[cfg(test)]
mod tests;

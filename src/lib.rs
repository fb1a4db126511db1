//! `kd`: knowledge distillation for image classifiers.
//!
//! Split an image folder, train a teacher and a student, distill the teacher into the
//! student, and evaluate and compare the results. From the bottom up: [`ops`] (what models
//! compute with: kd's CPU kernels or Burn's ops), [`data`], [`models`] (the model registry),
//! [`losses`] (the distillation methods), [`run`] (the run folder and its config), [`eval`],
//! [`train`], [`bench`], [`report`], [`experiment`] (`kd run`), and [`commands`] (the command
//! line). No module imports one above it.

pub mod bench;
pub mod commands;
pub mod data;
pub mod device;
pub mod eval;
pub mod experiment;
pub mod infer;
pub mod interrupt;
pub mod io;
pub mod losses;
pub mod mem;
pub mod models;
pub mod ops;
pub mod report;
pub mod run;
pub mod train;

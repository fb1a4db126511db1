//! `kd`: knowledge distillation for image classifiers.
//!
//! Split an image folder, train a teacher and a student, distill the teacher into the
//! student with Hinton's loss, and evaluate and compare the results.

pub mod autocast;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod conv;
pub mod data;
pub mod device;
pub mod eval;
pub mod flex;
pub mod gelu;
pub mod io;
pub mod losses;
pub mod metrics;
pub mod models;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod report;
pub mod run;
pub mod schedule;
pub mod study;
pub mod train;

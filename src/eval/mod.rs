//! Evaluation and prediction with a trained network: scores (accuracy, per-class and macro
//! F1, confusion matrix), `kd eval`'s report, and `kd predict`'s top classes.

mod evaluate;
mod predict;
mod scores;

pub use evaluate::{EvalReport, EvalTarget, argmax, eval_target, evaluate};
pub use predict::{Images, Prediction, Scored, predict};
pub use scores::{ClassScores, ConfusionMatrix, Evaluation};

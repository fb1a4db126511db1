//! Reporting: PNG charts (curves, confusion matrix) and `kd compare`'s results table.

pub mod charts;
pub mod compare;

pub use charts::{Series, confusion_png, curves_png};
pub use compare::{RunRow, SpeedOptions, compare, results_table};

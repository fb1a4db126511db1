//! Reporting: PNG charts (curves, confusion matrix) and `kd compare`'s results tables (runs,
//! and methods over seeds).

pub mod charts;
pub mod compare;
pub mod methods;

pub use charts::{CONFUSION_PNG_MAX_CLASSES, Series, confusion_png, curves_png};
pub use compare::{Comparison, RunRow, SpeedOptions, compare, results_table};

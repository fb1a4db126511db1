//! Classification metrics: accuracy, confusion matrix, per-class precision/recall/F1,
//! macro and micro F1 (the Plant Seedlings competition's metric).

use serde::{Deserialize, Serialize};

/// Scores of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    /// Class name.
    pub class: String,
    /// Precision: correct / predicted as this class.
    pub precision: f64,
    /// Recall: correct / truly this class.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Number of images truly of this class.
    pub support: usize,
}

/// Evaluation report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of images classified correctly.
    pub accuracy: f64,
    /// Mean of per-class F1.
    pub macro_f1: f64,
    /// F1 over all decisions (equals accuracy for single-label classification).
    pub micro_f1: f64,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Number of images.
    pub images: usize,
    /// Per-class scores, in class order.
    pub per_class: Vec<ClassScores>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Class names.
    pub classes: Vec<String>,
}

/// Accumulates predictions into a confusion matrix.
#[derive(Debug, Clone)]
pub struct ConfusionMatrix {
    counts: Vec<Vec<usize>>,
}

impl ConfusionMatrix {
    /// An empty matrix for `n` classes.
    pub fn new(n: usize) -> Self {
        Self {
            counts: vec![vec![0; n]; n],
        }
    }

    /// Records one prediction.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth][predicted] += 1;
    }

    /// Total number of recorded predictions.
    pub fn total(&self) -> usize {
        self.counts.iter().flatten().sum()
    }

    /// Fraction of correct predictions.
    pub fn accuracy(&self) -> f64 {
        let correct: usize = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// Full report with class names and mean loss.
    pub fn evaluation(&self, classes: &[String], loss: f64) -> Evaluation {
        let n = self.counts.len();
        let mut per_class = Vec::with_capacity(n);
        let (mut tp_all, mut fp_all, mut fn_all) = (0usize, 0usize, 0usize);
        // As scikit-learn's macro average: over the classes that occur as a label or as a
        // prediction (a class absent from both says nothing about the model).
        let mut present_f1 = Vec::with_capacity(n);
        for (c, name) in classes.iter().enumerate().take(n) {
            let tp = self.counts[c][c];
            let predicted: usize = (0..n).map(|t| self.counts[t][c]).sum();
            let support: usize = self.counts[c].iter().sum();
            let (fp, fnn) = (predicted - tp, support - tp);
            tp_all += tp;
            fp_all += fp;
            fn_all += fnn;
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let score = f1(precision, recall);
            if support + predicted > 0 {
                present_f1.push(score);
            }
            per_class.push(ClassScores {
                class: name.clone(),
                precision,
                recall,
                f1: score,
                support,
            });
        }
        let macro_f1 = present_f1.iter().sum::<f64>() / present_f1.len().max(1) as f64;
        let micro_f1 = f1(
            ratio(tp_all, tp_all + fp_all),
            ratio(tp_all, tp_all + fn_all),
        );
        Evaluation {
            accuracy: self.accuracy(),
            macro_f1,
            micro_f1,
            loss,
            images: self.total(),
            per_class,
            confusion: self.counts.clone(),
            classes: classes.to_vec(),
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

impl Evaluation {
    /// Human-readable report: summary, per-class table and confusion matrix.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "images {}  accuracy {:.2}%  macro F1 {:.4}  micro F1 {:.4}  loss {:.4}\n\n",
            self.images,
            self.accuracy * 100.0,
            self.macro_f1,
            self.micro_f1,
            self.loss
        );
        // Widths in characters (what `{:<w$}` pads by), not bytes.
        let w = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        s += &format!(
            "{:<w$}  {:>9}  {:>6}  {:>6}  {:>7}\n",
            "class", "precision", "recall", "f1", "support"
        );
        for c in &self.per_class {
            s += &format!(
                "{:<w$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
                c.class, c.precision, c.recall, c.f1, c.support
            );
        }
        s += "\nconfusion matrix (rows: true class, columns: predicted)\n";
        let labels: Vec<String> = (0..self.classes.len())
            .map(|i| format!("{i} {}", self.classes[i]))
            .collect();
        let w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        s += &format!("{:<w$}", "");
        for i in 0..self.classes.len() {
            s += &format!(" {i:>5}");
        }
        s += "\n";
        for (label, row) in labels.iter().zip(&self.confusion) {
            s += &format!("{label:<w$}");
            for v in row {
                s += &format!(" {v:>5}");
            }
            s += "\n";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_report_columns_line_up_for_long_and_non_ascii_names() {
        let classes: Vec<String> = ["Maize", "Small-flowered Cranesbill", "Löwenzahn"]
            .map(String::from)
            .to_vec();
        let mut m = ConfusionMatrix::new(3);
        for (t, p) in [(0, 0), (1, 1), (1, 2), (2, 2)] {
            m.add(t, p);
        }
        let text = m.evaluation(&classes, 0.5).to_text();
        let width = |l: &str| l.chars().count();
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("class"))
            .take(4)
            .collect();
        assert!(table.iter().all(|l| width(l) == width(table[0])), "{text}");
        let matrix: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("confusion"))
            .skip(1)
            .collect();
        assert_eq!(matrix.len(), 4, "{text}");
        assert!(
            matrix.iter().all(|l| width(l) == width(matrix[0])),
            "{text}"
        );
    }

    #[test]
    fn scores_of_a_known_matrix() {
        let mut m = ConfusionMatrix::new(2);
        // 3 true class-0: 2 right, 1 called class 1; 1 true class-1: right.
        m.add(0, 0);
        m.add(0, 0);
        m.add(0, 1);
        m.add(1, 1);
        let e = m.evaluation(&["a".into(), "b".into()], 0.5);
        assert_eq!(e.accuracy, 0.75);
        assert_eq!(e.per_class[0].precision, 1.0);
        assert!((e.per_class[0].recall - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.per_class[1].precision, 0.5);
        assert_eq!(e.per_class[1].recall, 1.0);
        let f1a = 2.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0);
        let f1b = 2.0 * 0.5 / 1.5;
        assert!((e.macro_f1 - (f1a + f1b) / 2.0).abs() < 1e-12);
        assert!((e.micro_f1 - 0.75).abs() < 1e-12);
        assert!(e.to_text().contains("75.00%"));
    }

    /// scikit-learn's default `f1_score(y_true, y_pred, average="macro")` (labels taken
    /// from y_true and y_pred) on y_true [0, 1], y_pred [0, 2] of 4 classes: class 3 occurs
    /// nowhere and is left out; class 2 (predicted, no support) and class 1 (missed) count
    /// as 0: (1 + 0 + 0) / 3.
    #[test]
    fn macro_f1_leaves_out_classes_that_occur_nowhere() {
        let mut m = ConfusionMatrix::new(4);
        m.add(0, 0);
        m.add(1, 2);
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let e = m.evaluation(&names, 0.0);
        assert!((e.macro_f1 - 1.0 / 3.0).abs() < 1e-12, "{}", e.macro_f1);
        assert_eq!(e.per_class.len(), 4, "every class keeps its row");
    }
}

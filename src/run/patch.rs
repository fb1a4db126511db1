//! Patches over a [`TrainConfig`]: command-line flags and the tables of a `kd run` file are
//! both a flat table of keys (the config's own keys, and a few short names for nested ones:
//! `model`, `width`, `stem`, `method` and each method's settings), checked against the keys
//! the table may set, nested ([`nest`]) and merged onto a base config ([`apply`]): the recipe,
//! or on `--resume` the config the run recorded.

use anyhow::{Result, bail};
use serde_json::{Map, Value};

use super::TrainConfig;
use crate::losses::Method;

/// The keys of a stage that name the network: `model` (its name), `width`, `stem`.
pub const MODEL_KEYS: [&str; 3] = ["model", "width", "stem"];

/// The keys of the distillation besides each method's settings: `method` (`loss` before),
/// `cache_teacher`, `teacher_checkpoint`, `feature_weight`.
pub const DISTILL_KEYS: [&str; 4] = [
    "method",
    "cache_teacher",
    "teacher_checkpoint",
    "feature_weight",
];

/// Config keys a table cannot set: the images and the teacher come from elsewhere.
const NOT_IN_TABLES: [&str; 3] = ["data", "model", "teacher"];

/// Which keys a table may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Training keys only (`[recipe]`).
    Recipe,
    /// Training and model keys (`[teacher]`, `[student]`, `kd train`).
    Stage,
    /// Training, model and distillation keys (`[distill]`, `kd distill`).
    Distill,
}

/// The keys `table` may set, in the order messages list them.
pub fn known_keys(table: Table) -> Vec<String> {
    let Ok(Value::Object(fields)) = serde_json::to_value(TrainConfig::default()) else {
        unreachable!("a config serialises to an object")
    };
    let mut keys: Vec<String> = fields
        .keys()
        .map(String::as_str)
        .chain(["split_seed"]) // left out of the JSON when unset
        .filter(|k| !NOT_IN_TABLES.contains(k))
        .map(String::from)
        .collect();
    if table != Table::Recipe {
        keys.extend(MODEL_KEYS.map(String::from));
    }
    if table == Table::Distill {
        keys.extend(Method::all_keys());
        keys.extend(DISTILL_KEYS.map(String::from));
    }
    keys
}

/// Refuses a key that `table` does not take, listing those it does (and the closest, when a
/// key looks misspelt), and a key without a value (TOML's `nan` and `inf` have no JSON
/// form); `section` names the table in the message (`[distill]`).
pub fn check_keys(flat: &Map<String, Value>, table: Table, section: &str) -> Result<()> {
    if let Some(key) = null_key(flat) {
        bail!("{section} {key} has no value (nan or inf?): use a finite number");
    }
    let known = known_keys(table);
    // `loss` is what older kds called `method`.
    let takes = |k: &str| known.iter().any(|n| n == k) || (table == Table::Distill && k == "loss");
    let unknown = flat.keys().map(String::as_str).find(|k| !takes(k));
    match unknown {
        Some("data") => bail!("{section} cannot set `data`: the images come from [data] path"),
        Some("teacher") => bail!(
            "{section} cannot set `teacher`: the KD student learns from the study's teacher stage"
        ),
        Some(key) => match closest(key, &known) {
            Some(near) => bail!("{section} has an unknown key `{key}`: did you mean `{near}`?"),
            None => bail!(
                "{section} has an unknown key `{key}`: use one of {}",
                known.join(", ")
            ),
        },
        None => check_model_keys(flat, section),
    }
}

/// The first key, dotted through nested tables (`augment.rotation_degrees`), whose value is
/// null.
fn null_key(flat: &Map<String, Value>) -> Option<String> {
    flat.iter().find_map(|(k, v)| match v {
        Value::Null => Some(k.clone()),
        Value::Object(inner) => null_key(inner).map(|n| format!("{k}.{n}")),
        _ => None,
    })
}

/// The known key within two edits of `key` (the nearest), if any.
fn closest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k.as_str()))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Refuses model keys of the wrong kind (a width of "4" or -4, say), naming the key.
fn check_model_keys(flat: &Map<String, Value>, section: &str) -> Result<()> {
    if let Some(v) = flat.get("model")
        && !v.is_string()
    {
        bail!("{section} model must be a name such as \"resnet18\" (see `kd models`)");
    }
    if let Some(v) = flat.get("width")
        && v.as_u64().is_none_or(|w| w == 0)
    {
        bail!("{section} width must be a positive whole number, not {v}");
    }
    if let Some(v) = flat.get("stem")
        && serde_json::from_value::<crate::models::Stem>(v.clone()).is_err()
    {
        bail!("{section} stem must be \"imagenet\" or \"small\", not {v}");
    }
    Ok(())
}

/// A flat table as a patch of the config's nested keys: `model`, `width` and `stem` go under
/// `model`; `method` (or `loss`) and the methods' settings under `teacher.kd`; `teacher`,
/// `teacher_checkpoint`, `cache_teacher` and `feature_weight` under `teacher`; every other
/// key stays.
pub fn nest(flat: &Map<String, Value>) -> Value {
    let method_keys = Method::all_keys();
    let mut out = Value::Object(Map::new());
    for (key, value) in flat {
        let path: Vec<&str> = match key.as_str() {
            "model" => vec!["model", "name"],
            "width" | "stem" => vec!["model", key],
            "method" | "loss" => vec!["teacher", "kd", "method"],
            "teacher" => vec!["teacher", "run"],
            "teacher_checkpoint" => vec!["teacher", "checkpoint"],
            "cache_teacher" => vec!["teacher", "cache_logits"],
            "feature_weight" => vec!["teacher", "feature_weight"],
            k if method_keys.iter().any(|m| m == k) => vec!["teacher", "kd", k],
            k => vec![k],
        };
        set_path(&mut out, &path, value.clone());
    }
    out
}

fn set_path(root: &mut Value, path: &[&str], value: Value) {
    let mut at = root;
    for part in &path[..path.len() - 1] {
        let map = at.as_object_mut().expect("patches are objects");
        at = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
    }
    let last = path[path.len() - 1].to_string();
    at.as_object_mut()
        .expect("patches are objects")
        .insert(last, value);
}

/// Merges `over` into `base`: objects key by key, anything else replaced.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The method a settings table names, by its registered name (aliases resolved).
fn method_name(kd: &Value) -> Option<&'static str> {
    let name = kd.get("method").or_else(|| kd.get("loss"))?.as_str()?;
    Method::defaults(name).map(|m| m.name())
}

/// `base` with the nested `patch` applied. A patch that names another method than the base
/// replaces the base's settings instead of merging into them (the methods' keys mean
/// different things). Nothing is validated beyond the types.
pub fn apply(base: &TrainConfig, patch: &Value) -> Result<TrainConfig> {
    let mut value = serde_json::to_value(base)?;
    let new_method = patch.pointer("/teacher/kd").and_then(method_name);
    let old_method = value.pointer("/teacher/kd").and_then(method_name);
    if let Some(name) = new_method
        && old_method.is_some_and(|old| old != name)
        && let Some(kd) = value.pointer_mut("/teacher/kd")
    {
        *kd = Value::Object(Map::new());
    }
    merge(&mut value, patch);
    Ok(serde_json::from_value(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn flat_keys_nest_where_the_config_keeps_them() {
        let patch = nest(&flat(json!({
            "model": "resnet18", "width": 8, "epochs": 3, "temperature": 4.0,
            "loss": "seed", "teacher": "runs/t", "cache_teacher": true,
            "augment": {"hflip": true}
        })));
        assert_eq!(
            patch,
            json!({
                "model": {"name": "resnet18", "width": 8}, "epochs": 3,
                "teacher": {"run": "runs/t", "cache_logits": true,
                    "kd": {"temperature": 4.0, "method": "seed"}},
                "augment": {"hflip": true}
            })
        );
        let config = apply(&TrainConfig::default(), &patch).unwrap();
        assert_eq!(config.epochs, 3);
        assert!(config.augment.hflip && config.augment.rotation_degrees == 10.0);
        let teacher = config.teacher.unwrap();
        assert_eq!(teacher.kd.name(), "tutorial");
        assert!(teacher.cache_logits);
    }

    #[test]
    fn another_method_replaces_the_settings_and_the_same_one_merges() {
        let base = apply(
            &TrainConfig::default(),
            &nest(&flat(json!({"teacher": "t", "temperature": 3.0}))),
        )
        .unwrap();
        let same = apply(
            &base,
            &nest(&flat(json!({"method": "hinton", "alpha": 0.5}))),
        )
        .unwrap();
        let kd = serde_json::to_value(&same.teacher.unwrap().kd).unwrap();
        assert_eq!(
            (kd["temperature"].as_f64(), kd["alpha"].as_f64()),
            (Some(3.0), Some(0.5))
        );
        let other = apply(&base, &nest(&flat(json!({"method": "tutorial"})))).unwrap();
        let kd = serde_json::to_value(&other.teacher.unwrap().kd).unwrap();
        assert_eq!(
            kd["temperature"].as_f64(),
            Some(7.0),
            "the tutorial's default"
        );
    }

    #[test]
    fn unknown_keys_name_the_table_and_what_it_takes() {
        let err = check_keys(
            &flat(json!({"kd_loss": "seed"})),
            Table::Distill,
            "[distill]",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[distill] has an unknown key `kd_loss`")
                && err.contains("temperature")
                && err.contains("method"),
            "{err}"
        );
        let err = check_keys(&flat(json!({"temperature": 4})), Table::Stage, "[student]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `temperature`"), "{err}");
        assert!(check_keys(&flat(json!({"loss": "seed"})), Table::Distill, "[distill]").is_ok());
        let err = check_keys(&flat(json!({"temperatur": 4})), Table::Distill, "[distill]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `temperature`?"), "{err}");
        let err = check_keys(
            &flat(json!({"augment": {"rotation_degrees": null}})),
            Table::Recipe,
            "[recipe]",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[recipe] augment.rotation_degrees has no value"),
            "{err}"
        );
    }
}

//! Property-based fuzzing of the image decoding path and the folder scanner: whatever the
//! bytes or the folder tree, kd returns a result or a clear error, never a panic.
//!
//! CI runs a few hundred cases; fuzz longer with e.g.
//! `PROPTEST_CASES=20000 cargo test --release --test fuzz`.

mod common;

use std::path::Path;

use kd::data::{ImageFolder, load_image};
use proptest::prelude::*;

fn real_png() -> Vec<u8> {
    let dir = common::mnist().join("3");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    std::fs::read(&files[0]).unwrap()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048), ext in prop::sample::select(vec!["png", "jpg", "bmp", "webp"])) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("x.{ext}"));
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = load_image(&path) {
            prop_assert!(format!("{e:#}").contains("x."), "error names the file: {e:#}");
        }
    }

    #[test]
    fn mutated_real_images_never_panic_the_decoder(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16), cut in any::<prop::sample::Index>()) {
        let mut bytes = real_png();
        for (i, v) in flips {
            let n = bytes.len();
            bytes[i.index(n)] = v;
        }
        let keep = cut.index(bytes.len()) + 1;
        bytes.truncate(keep);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(img) = load_image(&path) {
            prop_assert_eq!(img.data.len(), img.width * img.height * 3);
        }
    }

    #[test]
    fn random_folder_trees_never_panic_the_scanner(entries in proptest::collection::vec((0u8..4, 0usize..3, "[a-c]{1,2}(\\.png|\\.txt|\\.jpg)?"), 0..25)) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut made: Vec<std::path::PathBuf> = vec![root.to_path_buf()];
        for (kind, parent, name) in entries {
            let base = made[parent.min(made.len() - 1)].clone();
            let path = base.join(&name);
            if path.exists() {
                continue;
            }
            match kind {
                0 => { let _ = std::fs::create_dir_all(&path); made.push(path); }
                1 => { let _ = std::fs::write(&path, b"not really an image"); }
                2 => { let _ = std::fs::write(&path, real_png()); }
                _ => {
                    #[cfg(unix)]
                    { let _ = std::os::unix::fs::symlink(&made[made.len() / 2], &path); }
                }
            }
        }
        if let Ok(folder) = ImageFolder::scan(root) {
            prop_assert!(!folder.classes.is_empty());
            for s in &folder.samples {
                prop_assert!(s.label < folder.classes.len());
                prop_assert!(Path::new(&s.path).exists());
            }
        }
    }
}

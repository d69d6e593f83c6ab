//! Every WGSL module is valid for both precisions, and a broken one is reported with its line.

use kiln::Precision;
use kiln::shaders::{MODULES, specialised_source, validate_source};

#[test]
fn every_shader_module_validates_with_naga_in_both_precisions() {
    for (name, _) in MODULES {
        for p in Precision::ALL {
            let src = specialised_source(name, p).unwrap();
            if let Err(e) = validate_source(name, &src) {
                panic!("{name} ({p}) does not validate:\n{e}");
            }
        }
    }
}

#[test]
fn every_file_in_shaders_dir_belongs_to_a_module() {
    // A new .wgsl file that no module lists would never be validated or compiled.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let listed: Vec<String> = MODULES
        .iter()
        .flat_map(|(_, parts)| parts.iter().map(|s| s.to_string()))
        .collect();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                listed.contains(&text),
                "{} is not part of any module in shaders::MODULES",
                path.display()
            );
        }
    }
}

#[test]
fn a_wgsl_error_names_line_and_message() {
    let src = "alias T = f32;\n@compute @workgroup_size(1)\nfn main() {\n    let x: T = undefined_name;\n}\n";
    let e = validate_source("broken", src)
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("undefined_name"), "{e}");
    assert!(
        e.contains("broken:4:"),
        "message should carry file:line, got:\n{e}"
    );
}

#[test]
fn a_validation_error_is_reported_too() {
    // Parses, but storing an f32 into a u32 variable is a type error found by the validator stage
    // or the parser; either way the message must say what is wrong.
    let src = "alias T = f32;\n@compute @workgroup_size(1)\nfn main() {\n    var x: u32 = 0u;\n    x = T(1.5);\n}\n";
    let e = validate_source("typed", src)
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("typed:5:"), "{e}");
}

//! The module layers of src/ (docs/design.md): every
//! `use crate::…`, `crate::…` and `super::…` path of a module may name only
//! modules of its own layer or below, and no modules import each other in
//! a cycle. Unit-test modules (`#[cfg(test)] mod tests`) may look anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first.
const LAYERS: &[&[&str]] = &[
    &["sys", "error", "clock", "log", "fault"], // ABI and what everything uses
    &["ctrl", "process", "cpus", "io_scheduler"], // control plane, processes, CPUs, I/O scheduler
    &["emulate", "integrity", "config", "layout", "plan", "run_files", "teardown"], // emulation, PI, device config, thread layout and plan, run files, deleting both
    &["request"],                                                                   // request and data types
    &["stats"],
    &["backend"], // no threads, no server
    &["queue"],   // the queue thread, the loop both planes share, per-tag and batch planes
    &["server"],
    &["recovery"],                                  // takeover
    &["daemonize", "supervisor", "server_process"], // processes and a server's life
    &["cli", "cmd", "downtime"],                    // the command line
];

/// What `downtime` may use besides itself: the control plane, run files,
/// a device's plan, process helpers and what they stand on, its arguments, and `add`
/// (`cmd`) with the backends' sizes (`backend`), to make its device as
/// `add` makes one, without a command line between them.
const DOWNTIME_MAY_USE: &[&str] = &[
    "sys",
    "error",
    "clock",
    "log",
    "ctrl",
    "process",
    "config",
    "plan",
    "run_files",
    "cli",
    "cmd",
    "backend",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path of every .rs file under src/ (`backend::nvme`), crate root excluded.
fn modules() -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src()).unwrap().with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
                if parts.last().is_some_and(|l| l == "mod") {
                    parts.pop();
                }
                if !matches!(parts.as_slice(), [one] if one == "lib" || one == "main") {
                    out.insert(parts.join("::"), path);
                }
            }
        }
    }
    out
}

/// The code of a file without its unit-test module.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Expands one use tree (`a::{b, c::{d}}`) into paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let join = |p: &str, t: &str| match (p.is_empty(), t.is_empty()) {
        (true, _) => t.to_string(),
        (_, true) => p.to_string(),
        _ => format!("{p}::{t}"),
    };
    match tree.find('{') {
        Some(open) if tree.ends_with('}') => {
            let head = tree[..open].trim_end_matches("::");
            let inner = &tree[open + 1..tree.len() - 1];
            let prefix = join(prefix, head);
            let (mut depth, mut start) = (0, 0);
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&prefix, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&prefix, &inner[start..], out);
        }
        _ if !tree.is_empty() => out.push(join(prefix, tree.split(" as ").next().unwrap())),
        _ => {}
    }
}

/// Every crate path the code names, as written after `crate::` (or
/// resolved from `super::` against `module`).
fn paths(module: &str, code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let compact: String = code.split_whitespace().collect::<Vec<_>>().join(" ");
    for stmt in compact.split(';') {
        if let Some(i) = stmt.find("use crate::") {
            expand("", &stmt[i + "use crate::".len()..], &mut out);
        }
        if let Some(i) = stmt.find("use super::") {
            let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
            expand(parent, &stmt[i + "use super::".len()..], &mut out);
        }
    }
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c == '$' || c.is_ascii_alphanumeric() || c == '_') {
            continue; // `$crate::` in a macro, or `ublk_bench_crate::`
        }
        let rest = &code[i + "crate::".len()..];
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        if end > 0 {
            out.push(rest[..end].trim_end_matches(':').to_string());
        }
    }
    out
}

/// The longest known module a path starts with.
fn resolve<'a>(mods: &'a BTreeMap<String, PathBuf>, path: &str) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().find_map(|n| mods.get_key_value(&parts[..n].join("::")).map(|(k, _)| k.as_str()))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap()
}

/// Module → modules it imports (not itself, its parent or its children).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut g = BTreeMap::new();
    for (m, path) in &mods {
        let deps: BTreeSet<String> = paths(m, &code(path))
            .iter()
            .filter_map(|p| resolve(&mods, p))
            .filter(|t| t != m && !m.starts_with(&format!("{t}::")) && !t.starts_with(&format!("{m}::")))
            .map(String::from)
            .collect();
        g.insert(m.clone(), deps);
    }
    g
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top(module)))
}

/// A cycle through `start`, if there is one (depth-first search).
fn cycle_from(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, trail)) = stack.pop() {
        for next in &g[&node] {
            if next == start {
                return Some([trail.clone(), vec![start.to_string()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [trail.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn the_parser_sees_every_kind_of_path() {
    let code = "use crate::a::{b, c::{d, e as f}};\nuse crate::{g, h::i};\nfn x() { crate::j::k(); $crate::l::m; }\nuse super::{n, o};";
    let got: BTreeSet<String> = paths("p::q", code).into_iter().collect();
    let want = ["a::b", "a::c::d", "a::c::e", "g", "h::i", "j::k", "p::n", "p::o"];
    for w in want {
        assert!(got.contains(w), "{w} missing from {got:?}");
    }
    assert!(
        !got.iter().any(|p| p.starts_with("l")),
        "$crate:: paths are the macro's, not an import: {got:?}"
    );
}

#[test]
fn every_module_has_a_layer() {
    let g = graph();
    assert!(g.len() >= 30, "only {} modules found under {}", g.len(), src().display());
    let missing: Vec<&String> = g.keys().filter(|m| layer(m).is_none()).collect();
    assert!(missing.is_empty(), "modules missing from LAYERS in tests/layers.rs: {missing:?}");
}

#[test]
fn modules_import_only_their_layer_or_below() {
    let g = graph();
    let mut wrong = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            if let (Some(a), Some(b)) = (layer(m), layer(d))
                && b > a
            {
                wrong.push(format!("{m} (layer {a}) imports {d} (layer {b})"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layer order:\n{}", wrong.join("\n"));
}

#[test]
fn no_module_import_cycle() {
    let g = graph();
    let cycles: Vec<String> = g.keys().filter_map(|m| cycle_from(&g, m)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "module import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn downtime_uses_only_the_control_plane_run_files_processes_and_add() {
    let g = graph();
    let mut used = BTreeSet::new();
    for (m, deps) in g.iter().filter(|(m, _)| top(m) == "downtime") {
        for d in deps.iter().filter(|d| top(d) != "downtime") {
            used.insert(format!("{} (from {m})", top(d)));
            assert!(
                DOWNTIME_MAY_USE.contains(&top(d)),
                "{m} imports {d}: downtime may use only {DOWNTIME_MAY_USE:?}"
            );
        }
    }
    assert!(!used.is_empty(), "downtime imports nothing: the parser is broken");
}

/// The two data-plane protocols share the loop (`queue::run_loop`) and the
/// queue's thread and setup (`queue`), and nothing of each other.
#[test]
fn the_data_planes_share_only_the_loop() {
    let g = graph();
    for (a, b) in [("queue::per_tag", "queue::batch"), ("queue::batch", "queue::per_tag")] {
        assert!(g.contains_key(a), "{a} missing: the rooms of src/queue/ moved");
        assert!(!g[a].contains(b), "{a} imports {b}: what both need goes in queue::run_loop");
        assert!(g[a].contains("queue::run_loop"), "{a} does not run the shared loop");
    }
}

//! The library's top-level modules import each other without a cycle: data flows one way, and
//! the modules form layers (ARCHITECTURE.md, "Layers"), each importing only from layers below.
//!
//! Reads every file under `src/` except `src/main.rs` (a crate of its own, as `src/bin/` would
//! be), finds each `crate::<module>` path (`use` lines, `use crate::{a, b}` trees, inline
//! paths) and builds the graph of top-level modules (`crate::now_ms` and other items of `lib.rs`
//! count as the crate root). Not counted: comments (doc comments included), string and char
//! literals, the items under `#[cfg(test)]` (the `mod tests { … }` blocks, test-only functions)
//! and the files they declare (`#[cfg(test)] mod tests;`: `src/auth/tests.rs`,
//! `src/backend/embedded/tests.rs`), and `super::` / `self::` paths, which stay inside one
//! top-level module.
//!
//! On failure it prints each cycle with the file:line of every import that makes it up. A cycle
//! is usually broken by moving the item that the lower module needs into it (or into a leaf such
//! as `labels`), and re-exporting it from its old path.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Node of the items defined in `lib.rs` itself (`crate::now_ms`).
const ROOT: &str = "<root>";

/// One import of a module by another: where it is written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Site {
    file: String,
    line: usize,
}

/// Top-level module → module it imports → the sites of those imports.
type Graph = BTreeMap<String, BTreeMap<String, Vec<Site>>>;

fn src_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Replace comments and the contents of string and char literals with spaces, keeping every
/// newline (so line numbers stay) and every other byte offset.
fn blank(text: &str) -> String {
    let b = text.as_bytes();
    let n = b.len();
    let mut out = b.to_vec();
    let wipe = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(n)] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < n {
        if b[i..].starts_with(b"//") {
            let end = b[i..].iter().position(|&c| c == b'\n').map_or(n, |p| i + p);
            wipe(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < n && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            wipe(&mut out, i, j);
            i = j;
        } else if let Some((open, hashes)) = raw_string_at(b, i) {
            // Raw string: r"…", r#"…"#, br"…".
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let end = (open..n).find(|&j| b[j..].starts_with(&close)).unwrap_or(n);
            wipe(&mut out, open, end);
            i = end + close.len();
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < n && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            wipe(&mut out, i + 1, j);
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', 'é'), or else a lifetime ('a).
            if i + 1 < n && b[i + 1] == b'\\' {
                let end = (i + 3..n).find(|&j| b[j] == b'\'').unwrap_or(n);
                wipe(&mut out, i + 1, end);
                i = end + 1;
            } else {
                let len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                if i + 1 + len < n && b[i + 1 + len] == b'\'' {
                    wipe(&mut out, i + 1, i + 1 + len);
                    i += len + 2;
                } else {
                    i += 1;
                }
            }
        } else {
            i += 1;
        }
    }
    // Every non-ASCII byte was inside a comment or a literal; lossy only if a name was not.
    String::from_utf8_lossy(&out).into_owned()
}

/// If a raw string (`r"`, `r#"`, `br"`) starts at `i`: where its contents start, and its `#`s.
fn raw_string_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let k = if b[i..].starts_with(b"br") {
        i + 2
    } else if b[i] == b'r' {
        i + 1
    } else {
        return None;
    };
    let hashes = b[k..].iter().take_while(|&&c| c == b'#').count();
    (b.get(k + hashes) == Some(&b'"')).then_some((k + hashes + 1, hashes))
}

/// Index just past the bracket that closes the one at `open` (`(`, `[` or `{`), or the end.
fn close_of(b: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
    }
    b.len()
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn word_at(b: &[u8], i: usize) -> &str {
    let end = (i..b.len()).find(|&j| !(b[j].is_ascii_alphanumeric() || b[j] == b'_')).unwrap_or(b.len());
    std::str::from_utf8(&b[i..end]).unwrap_or("")
}

/// Blank every item (or statement, field) under `#[cfg(test)]` in already blanked code; return
/// the names of the modules declared `#[cfg(test)] mod name;` (their files are test code too).
fn strip_cfg_test(code: &mut String) -> Vec<String> {
    const ATTR: &str = "#[cfg(test)]";
    const ITEM_WORDS: &str = "pub mod fn async const unsafe extern impl struct enum trait type static use macro_rules";
    let mut test_mods = Vec::new();
    let mut out = code.clone().into_bytes();
    let b = code.as_bytes();
    let mut from = 0;
    while let Some(p) = code[from..].find(ATTR).map(|p| p + from) {
        // Further attributes of the same item.
        let mut i = skip_ws(b, p + ATTR.len());
        while b[i..].starts_with(b"#[") {
            i = skip_ws(b, close_of(b, i + 1));
        }
        let is_item = ITEM_WORDS.split(' ').any(|w| w == word_at(b, i));
        // An item ends with `;` or its first `{ … }` block; a statement, field or match arm
        // also with `,`, or where the enclosing block ends.
        let mut j = i;
        let end = loop {
            if j >= b.len() {
                break b.len();
            }
            match b[j] {
                b';' => break j + 1,
                b',' if !is_item => break j + 1,
                b'{' => break close_of(b, j),
                b'(' | b'[' => j = close_of(b, j),
                b')' | b']' | b'}' => break j,
                _ => j += 1,
            }
        };
        let item = String::from_utf8_lossy(&b[i..end]).into_owned();
        let words: Vec<&str> =
            item.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
        if item.trim_end().ends_with(';') && !item.contains('{') {
            if let Some(k) = words.iter().position(|w| *w == "mod") {
                if let Some(name) = words.get(k + 1) {
                    test_mods.push((*name).to_owned());
                }
            }
        }
        for c in &mut out[p..end] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        from = end.max(p + ATTR.len());
    }
    *code = String::from_utf8_lossy(&out).into_owned();
    test_mods
}

/// Every `crate::<name>` in cleaned code (`use crate::{a::X, b}` counts `a` and `b`), with its
/// line.
fn crate_refs(code: &str) -> Vec<(String, usize)> {
    let b = code.as_bytes();
    let line_of = |i: usize| code[..i].bytes().filter(|&c| c == b'\n').count() + 1;
    let mut refs = Vec::new();
    let mut from = 0;
    while let Some(p) = code[from..].find("crate").map(|p| p + from) {
        from = p + 5;
        if p > 0 && (b[p - 1].is_ascii_alphanumeric() || b[p - 1] == b'_') {
            continue;
        }
        let i = skip_ws(b, p + 5);
        if !b[i..].starts_with(b"::") {
            continue; // `pub(crate)`, `crate` as a word elsewhere
        }
        let i = skip_ws(b, i + 2);
        if b.get(i) == Some(&b'{') {
            let end = close_of(b, i);
            let mut depth = 0usize;
            let mut start = true;
            for (j, &c) in b.iter().enumerate().take(end.saturating_sub(1)).skip(i + 1) {
                match c {
                    b'{' => depth += 1,
                    b'}' => depth = depth.saturating_sub(1),
                    b',' if depth == 0 => start = true,
                    c if start && (c.is_ascii_alphabetic() || c == b'_') => {
                        refs.push((word_at(b, j).to_owned(), line_of(j)));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = word_at(b, i);
            if !name.is_empty() {
                refs.push((name.to_owned(), line_of(p)));
            }
        }
    }
    refs
}

/// Source files under `dir`, as paths relative to `src`.
fn rust_files(src: &Path, dir: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(src, &path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path.strip_prefix(src).unwrap().to_path_buf());
        }
    }
}

/// The module graph of sources given as (path relative to `src/`, text); `lib.rs` declares the
/// top-level modules.
fn graph_of(sources: &[(PathBuf, String)]) -> Graph {
    let mut cleaned = Vec::new();
    let mut test_paths: Vec<PathBuf> = Vec::new();
    for (path, text) in sources {
        let mut code = blank(text);
        for name in strip_cfg_test(&mut code) {
            // `mod name;` in a/b.rs is a/b/name.rs; in a/mod.rs or lib.rs it is a/name.rs.
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let parent = path.parent().unwrap_or(Path::new(""));
            let dir = if matches!(stem, "mod" | "lib" | "main") { parent.to_path_buf() } else { parent.join(stem) };
            test_paths.push(dir.join(format!("{name}.rs")));
            test_paths.push(dir.join(name));
        }
        cleaned.push((path.clone(), code));
    }
    let lib = cleaned.iter().find(|(p, _)| p == Path::new("lib.rs")).map(|(_, c)| c.as_str()).unwrap_or("");
    let lb = lib.as_bytes();
    let mut modules = BTreeSet::new();
    let mut from = 0;
    while let Some(p) = lib[from..].find("mod").map(|p| p + from) {
        from = p + 3;
        let word_start = p == 0 || !(lb[p - 1].is_ascii_alphanumeric() || lb[p - 1] == b'_');
        let i = skip_ws(lb, p + 3);
        if word_start && i > p + 3 {
            let name = word_at(lb, i);
            if !name.is_empty() && lb.get(skip_ws(lb, i + name.len())) == Some(&b';') {
                modules.insert(name.to_owned());
            }
        }
    }
    let mut graph = Graph::new();
    for (path, code) in &cleaned {
        if path == Path::new("main.rs") || path.starts_with("bin") || test_paths.iter().any(|t| path.starts_with(t)) {
            continue;
        }
        let first = path.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or("");
        let module = match first.strip_suffix(".rs") {
            Some("lib") => ROOT.to_owned(),
            Some(m) => m.to_owned(),
            None => first.to_owned(),
        };
        let node = graph.entry(module.clone()).or_default();
        for (name, line) in crate_refs(code) {
            let to = if modules.contains(&name) { name } else { ROOT.to_owned() };
            if to != module {
                let file = format!("src/{}", path.display());
                node.entry(to).or_default().push(Site { file, line });
            }
        }
    }
    for sites in graph.values_mut().flat_map(BTreeMap::values_mut) {
        sites.dedup();
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// A shortest cycle through the first module of `comp`, inside `comp`.
fn shortest_cycle(graph: &Graph, comp: &[String]) -> Vec<String> {
    let start = &comp[0];
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start.as_str()]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flat_map(|m| m.keys()) {
            if !comp.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![v.to_owned()];
                let mut at = v;
                while at != start.as_str() {
                    at = prev[at];
                    path.push(at.to_owned());
                }
                path.reverse();
                return path;
            }
            if !prev.contains_key(w.as_str()) {
                prev.insert(w.as_str(), v);
                queue.push_back(w);
            }
        }
    }
    comp.to_vec()
}

/// Every cycle, one per strongly connected component, each edge with its import sites.
fn report(graph: &Graph) -> String {
    let mut text = String::new();
    for comp in cycles(graph) {
        let cycle = shortest_cycle(graph, &comp);
        let _ = writeln!(text, "import cycle among {{{}}}: {} -> {}", comp.join(", "), cycle.join(" -> "), cycle[0]);
        for (k, from) in cycle.iter().enumerate() {
            let to = &cycle[(k + 1) % cycle.len()];
            let sites = &graph[from][to];
            let _ = writeln!(text, "  {from} -> {to}:");
            for s in sites {
                let _ = writeln!(text, "    {}:{}", s.file, s.line);
            }
        }
    }
    text
}

/// Longest import chain below each module: layer 0 imports no other module.
fn layers(graph: &Graph) -> BTreeMap<usize, Vec<String>> {
    fn depth<'a>(graph: &'a Graph, v: &'a str, memo: &mut BTreeMap<&'a str, usize>) -> usize {
        if let Some(&d) = memo.get(v) {
            return d;
        }
        memo.insert(v, 0); // only reached again through a cycle, which the test reports
        let d = graph.get(v).into_iter().flat_map(|m| m.keys()).map(|w| depth(graph, w, memo) + 1).max().unwrap_or(0);
        memo.insert(v, d);
        d
    }
    let mut memo = BTreeMap::new();
    let nodes: BTreeSet<&str> =
        graph.iter().flat_map(|(v, m)| std::iter::once(v.as_str()).chain(m.keys().map(String::as_str))).collect();
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for v in nodes {
        out.entry(depth(graph, v, &mut memo)).or_default().push(v.to_owned());
    }
    out
}

fn crate_graph() -> Graph {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    let sources: Vec<(PathBuf, String)> =
        files.into_iter().map(|p| (p.clone(), std::fs::read_to_string(src.join(&p)).unwrap())).collect();
    graph_of(&sources)
}

#[test]
fn top_level_modules_import_without_cycles() {
    let graph = crate_graph();
    // A scanner that finds nothing would pass; the gateway has many modules and imports.
    let edges: usize = graph.values().map(BTreeMap::len).sum();
    assert!(graph.len() >= 15 && edges >= 50, "found only {} modules and {edges} imports", graph.len());
    let cycles = report(&graph);
    assert!(
        cycles.is_empty(),
        "the library's modules must not import each other in a cycle (data flows one way; see ARCHITECTURE.md, \"Layers\"):\n{cycles}"
    );
    // For ARCHITECTURE.md (`cargo test --test layering -- --nocapture`).
    for (layer, modules) in layers(&graph) {
        eprintln!("L{layer}: {}", modules.join(", "));
    }
}

fn sources(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    files.iter().map(|(p, t)| (PathBuf::from(p), (*t).to_owned())).collect()
}

#[test]
fn a_cycle_is_reported_with_its_sites() {
    let graph = graph_of(&sources(&[
        ("lib.rs", "pub mod a;\npub mod b;\nmod c;\npub fn now_ms() -> i64 { 0 }\n"),
        ("a.rs", "use crate::b::X;\n"),
        ("b/mod.rs", "mod inner;\n"),
        ("b/inner.rs", "fn f() {\n    let _ = crate::c::g();\n}\n"),
        ("c.rs", "use crate::{now_ms, a::{Y, Z}};\n"),
    ]));
    let text = report(&graph);
    assert!(text.contains("import cycle among {a, b, c}: a -> b -> c -> a"), "{text}");
    assert!(text.contains("  a -> b:\n    src/a.rs:1\n"), "{text}");
    assert!(text.contains("  b -> c:\n    src/b/inner.rs:2\n"), "{text}");
    assert!(text.contains("  c -> a:\n    src/c.rs:1\n"), "{text}");
    assert!(graph["c"].contains_key(ROOT), "crate::now_ms is an import of the crate root");
}

#[test]
fn comments_literals_and_test_code_are_not_imports() {
    let graph = graph_of(&sources(&[
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        ("a.rs", "use crate::b::X;\n"),
        (
            "b/mod.rs",
            concat!(
                "//! [`crate::a`]\n",
                "/* crate::a /* nested */ crate::a */\n",
                "const S: &str = \"crate::a::x\";\n",
                "const R: &str = r#\"crate::a \"quoted\" \"#;\n",
                "const C: char = '\"'; fn f<'a>(x: &'a str) -> &'a str { x }\n",
                "pub(crate) fn g() {}\n",
                "#[cfg(test)]\nfn helper() { crate::a::y(); }\n",
                "#[cfg(test)]\nmod tests;\n",
                "#[cfg(test)]\n#[allow(dead_code)]\nmod more {\n    use crate::a::Z;\n}\n",
                "fn h() -> u8 { 1 }\n",
            ),
        ),
        ("b/tests.rs", "use crate::a::W;\n"),
    ]));
    assert!(report(&graph).is_empty(), "{graph:?}");
    assert!(!graph["b"].contains_key("a"), "{graph:?}");
    // The same import outside comments and test code is one.
    let graph = graph_of(&sources(&[
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        ("a.rs", "use crate::b::X;\n"),
        ("b/mod.rs", "#[cfg(test)]\nmod tests {}\n\nfn f() { crate::a::y(); }\n"),
    ]));
    assert_eq!(graph["b"]["a"], vec![Site { file: "src/b/mod.rs".into(), line: 4 }]);
    assert!(!report(&graph).is_empty());
}

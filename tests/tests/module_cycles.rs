//! No import circles between the source files of any crate of the workspace.
//!
//! Each crate's `src/` is read as text: comments and string literals are dropped, every `use`
//! tree and every `crate::`/`super::`/`self::` path is resolved to the file that defines the
//! name (following `use` re-exports, so `use crate::fl::strategy::Strategy` points at the file
//! that defines `Strategy`, not at `strategy/mod.rs`), and the file → file graph must have no
//! strongly connected component of two or more files. `mod x;` declarations are ownership,
//! not imports, and are not edges; test-only code (`#[cfg(test)]` modules) is left out. A
//! file that the checker cannot place (a name it cannot find) contributes no edge, so the
//! check under-reports rather than inventing circles; the unit tests below pin its reading.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path from the crate root (`["fl", "strategy", "api"]`).
type ModPath = Vec<String>;

/// One source file of a crate.
struct SourceFile {
    path: PathBuf,
    module: ModPath,
    /// Code with comments, strings and test-only modules removed.
    code: String,
}

/// Drops comments, string and char literals (keeping line structure).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'"' | b'#')) && !ident_before(b, i) {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                let ch_len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch_len) == Some(&b'\'')).then_some(i + 1 + ch_len)
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Removes `#[cfg(test)]` inline modules (`mod x { … }`).
fn drop_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(p) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..p]);
        let after = &rest[p + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ") {
            let semi = trimmed.find(';');
            let brace = trimmed.find('{');
            match (brace, semi) {
                (Some(bp), s) if s.is_none_or(|s| bp < s) => {
                    let start = after.len() - trimmed.len() + bp;
                    let mut depth = 0;
                    let mut end = after.len();
                    for (k, ch) in after[start..].char_indices() {
                        match ch {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = start + k + 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    rest = &after[end..];
                    continue;
                }
                _ => {}
            }
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `#[cfg(test)] mod name;` declarations (files that are test-only).
fn test_module_files(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(p) = rest.find("#[cfg(test)]") {
        let after = rest[p + 12..].trim_start();
        let decl = after.strip_prefix("pub ").unwrap_or(after);
        if let Some(d) = decl.strip_prefix("mod ") {
            let name: String = d
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if d[name.len()..].trim_start().starts_with(';') {
                out.insert(name);
            }
        }
        rest = &rest[p + 12..];
    }
    out
}

/// The source files of the crate whose `src/` is `src`, with their module paths.
fn crate_files(src: &Path) -> Vec<SourceFile> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(src).unwrap_or(&p);
                let mut module: ModPath = rel
                    .with_extension("")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                let last = module.last().cloned().unwrap_or_default();
                if last == "mod" || (module.len() == 1 && (last == "lib" || last == "main")) {
                    module.pop();
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let code = drop_test_modules(&strip(&text));
                files.push(SourceFile {
                    path: p,
                    module,
                    code,
                });
            }
        }
    }
    // A binary's main.rs is another crate root; test-only files are not the program.
    let mut test_only: BTreeSet<ModPath> = BTreeSet::new();
    for f in &files {
        for name in test_module_files(&strip(
            &std::fs::read_to_string(&f.path).unwrap_or_default(),
        )) {
            let mut m = f.module.clone();
            m.push(name);
            test_only.insert(m);
        }
    }
    files.retain(|f| {
        !f.path.ends_with("main.rs") && !test_only.iter().any(|t| f.module.starts_with(t))
    });
    files
}

/// One `use` leaf: the path and whether it is a glob.
#[derive(Clone, Debug)]
struct UseLeaf {
    path: Vec<String>,
    glob: bool,
    /// The name it binds in the module (`as` or the last segment).
    alias: Option<String>,
}

/// Expands one use tree (`a::{b, c::{d as e, self}, f::*}`).
fn expand_use(tree: &str) -> Vec<UseLeaf> {
    fn split_top(s: &str) -> Vec<&str> {
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        parts
            .into_iter()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect()
    }
    fn go(prefix: &[String], s: &str, out: &mut Vec<UseLeaf>) {
        let s = s.trim();
        if let Some(b) = s.find('{') {
            let head: Vec<String> = s[..b]
                .split("::")
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect();
            let inner = &s[b + 1..s.rfind('}').unwrap_or(s.len())];
            let mut p = prefix.to_vec();
            p.extend(head);
            for part in split_top(inner) {
                go(&p, part, out);
            }
            return;
        }
        let (path, alias) = match s.split_once(" as ") {
            Some((p, a)) => (p.trim(), Some(a.trim().to_string())),
            None => (s, None),
        };
        let mut p = prefix.to_vec();
        let mut glob = false;
        for seg in path.split("::").map(str::trim).filter(|x| !x.is_empty()) {
            if seg == "*" {
                glob = true;
            } else if seg != "self" {
                p.push(seg.to_string());
            }
        }
        out.push(UseLeaf {
            path: p,
            glob,
            alias,
        });
    }
    let mut out = Vec::new();
    go(&[], tree, &mut out);
    out
}

/// A module's names: what it defines, and what its `use` items import (name → leaf).
#[derive(Default)]
struct Scope {
    defined: BTreeSet<String>,
    imports: BTreeMap<String, UseLeaf>,
    globs: Vec<UseLeaf>,
}

const ITEM_KEYWORDS: [&str; 10] = [
    "fn",
    "struct",
    "enum",
    "trait",
    "type",
    "const",
    "static",
    "union",
    "mod",
    "macro_rules!",
];

fn words(code: &str) -> Vec<&str> {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// `use` statements of `code`: each tree text and where it starts.
fn use_statements(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(p) = code[i..].find("use ") {
        let at = i + p;
        let boundary = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
        if boundary && let Some(end) = code[at..].find(';') {
            let tree = &code[at + 4..at + end];
            if !tree.contains('(') && !tree.contains('=') {
                out.push((at, tree.split_whitespace().collect::<Vec<_>>().join(" ")));
            }
            i = at + end;
            continue;
        }
        i = at + 4;
    }
    out
}

fn scope_of(code: &str) -> Scope {
    let mut s = Scope::default();
    let w = words(code);
    for pair in w.windows(2) {
        if ITEM_KEYWORDS.contains(&pair[0]) {
            s.defined.insert(pair[1].trim_end_matches('!').to_string());
        }
    }
    for (_, tree) in use_statements(code) {
        for leaf in expand_use(&tree) {
            if leaf.glob {
                s.globs.push(leaf);
            } else if let Some(name) = leaf.alias.clone().or_else(|| leaf.path.last().cloned()) {
                s.imports.insert(name, leaf);
            }
        }
    }
    s
}

/// Every `crate::…`, `super::…`, `self::…` path written in `code`, and where.
fn inline_paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    for key in ["crate::", "super::", "self::"] {
        let mut i = 0;
        while let Some(p) = code[i..].find(key) {
            let at = i + p;
            i = at + key.len();
            if at > 0
                && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_' || b[at - 1] == b':')
            {
                continue;
            }
            let mut j = at;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            let segs: Vec<String> = code[at..j]
                .split("::")
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect();
            // `crate::{a, b}` is a use tree, read with the `use` items.
            if segs.len() > 1 {
                out.push((at, segs));
            }
        }
    }
    out
}

/// The byte ranges of the inline modules (`mod x { … }`) of `code`.
fn inline_modules(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(p) = code[i..].find("mod ") {
        let at = i + p;
        i = at + 4;
        if at > 0 && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_') {
            continue;
        }
        let rest = &code[at + 4..];
        let name_len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let after = rest[name_len..].trim_start();
        if !after.starts_with('{') {
            continue;
        }
        let open = at + 4 + (rest.len() - after.len());
        let mut depth = 0;
        for (k, ch) in code[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(open..open + k + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// `path`, written inside `depth` inline modules, as seen from the file's own module: the
/// `super`s that only leave inline modules are dropped; `None` when it stays in the file.
fn leave_inline(path: &[String], depth: usize) -> Option<Vec<String>> {
    if depth == 0 {
        return Some(path.to_vec());
    }
    if path.first().map(String::as_str) == Some("self") {
        return None;
    }
    let supers = path.iter().take_while(|s| *s == "super").count();
    if supers == 0 {
        return Some(path.to_vec());
    }
    if supers <= depth {
        let mut p = vec!["self".to_string()];
        p.extend(path[supers..].iter().cloned());
        return Some(p);
    }
    Some(path[depth..].to_vec())
}

/// The module graph of one crate and the resolver of paths to files.
struct Crate {
    files: Vec<SourceFile>,
    by_module: BTreeMap<ModPath, usize>,
    scopes: Vec<Scope>,
    /// `#[macro_export]` macros (they live at the crate root) and their files.
    exported_macros: BTreeMap<String, usize>,
}

impl Crate {
    fn new(src: &Path) -> Self {
        let files = crate_files(src);
        let by_module = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.clone(), i))
            .collect();
        let scopes = files.iter().map(|f| scope_of(&f.code)).collect();
        let mut exported_macros = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let mut rest = f.code.as_str();
            while let Some(p) = rest.find("#[macro_export]") {
                rest = &rest[p + 15..];
                if let Some(m) = rest.find("macro_rules!") {
                    let name: String = rest[m + 12..]
                        .trim_start()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    exported_macros.insert(name, i);
                }
            }
        }
        Crate {
            files,
            by_module,
            scopes,
            exported_macros,
        }
    }

    /// `path` written in module `from`, made absolute (`crate`/`super`/`self`, a child
    /// module, or a crate-root module); None for another crate's path.
    fn absolute(&self, from: &ModPath, path: &[String]) -> Option<ModPath> {
        let mut base = from.clone();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = from.clone();
                child.push(first.to_string());
                if !self.by_module.contains_key(&child) {
                    if from.is_empty() || !self.by_module.contains_key(&vec![first.to_string()]) {
                        return None;
                    }
                    base.clear();
                }
            }
            None => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file that defines what the absolute `path` names (following imports).
    fn resolve(&self, path: &ModPath, depth: usize) -> Option<usize> {
        if depth > 16 {
            return None;
        }
        // The longest prefix that is a module file.
        let mut k = path.len();
        while k > 0 && !self.by_module.contains_key(&path[..k]) {
            k -= 1;
        }
        let module = &path[..k];
        let file = *self.by_module.get(module)?;
        let Some(name) = path.get(k) else {
            return Some(file);
        };
        let scope = &self.scopes[file];
        if k == 0
            && let Some(&m) = self.exported_macros.get(name)
        {
            return Some(m);
        }
        if scope.defined.contains(name) {
            return Some(file);
        }
        if let Some(leaf) = scope.imports.get(name) {
            let mut target = self.absolute(&module.to_vec(), &leaf.path)?;
            target.extend(path[k + 1..].iter().cloned());
            return self.resolve(&target, depth + 1);
        }
        for g in &scope.globs {
            let mut target = self.absolute(&module.to_vec(), &g.path)?;
            target.extend(path[k..].iter().cloned());
            if let Some(f) = self.resolve(&target, depth + 1)
                && f != file
            {
                return Some(f);
            }
        }
        Some(file)
    }

    /// file → files it imports from, each with the first path that ties them.
    fn edges(&self) -> BTreeMap<usize, BTreeMap<usize, String>> {
        let mut edges: BTreeMap<usize, BTreeMap<usize, String>> = BTreeMap::new();
        for (i, f) in self.files.iter().enumerate() {
            let mut found: Vec<(usize, Vec<String>)> = Vec::new();
            for (at, tree) in use_statements(&f.code) {
                found.extend(expand_use(&tree).into_iter().map(|l| (at, l.path)));
            }
            found.extend(inline_paths(&f.code));
            let inline = inline_modules(&f.code);
            for (at, p) in found {
                let depth = inline.iter().filter(|r| r.contains(&at)).count();
                let Some(p) = leave_inline(&p, depth) else {
                    continue;
                };
                if let Some(abs) = self.absolute(&f.module, &p)
                    && let Some(t) = self.resolve(&abs, 0)
                    && t != i
                {
                    edges.entry(i).or_default().entry(t).or_insert(p.join("::"));
                }
            }
        }
        edges
    }

    /// Strongly connected components of two or more files (Tarjan).
    fn circles(&self) -> Vec<Vec<String>> {
        let edges = self.edges();
        let n = self.files.len();
        let mut index = vec![usize::MAX; n];
        let mut low = vec![0; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut next = 0;
        let mut out = Vec::new();
        fn visit(
            v: usize,
            edges: &BTreeMap<usize, BTreeMap<usize, String>>,
            st: &mut (Vec<usize>, Vec<usize>, Vec<bool>, Vec<usize>, usize),
            out: &mut Vec<Vec<usize>>,
        ) {
            st.0[v] = st.4;
            st.1[v] = st.4;
            st.4 += 1;
            st.3.push(v);
            st.2[v] = true;
            for &w in edges.get(&v).into_iter().flat_map(|m| m.keys()) {
                if st.0[w] == usize::MAX {
                    visit(w, edges, st, out);
                    st.1[v] = st.1[v].min(st.1[w]);
                } else if st.2[w] {
                    st.1[v] = st.1[v].min(st.0[w]);
                }
            }
            if st.1[v] == st.0[v] {
                let mut comp = Vec::new();
                while let Some(w) = st.3.pop() {
                    st.2[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    out.push(comp);
                }
            }
        }
        let mut st = (
            std::mem::take(&mut index),
            std::mem::take(&mut low),
            std::mem::take(&mut on_stack),
            std::mem::take(&mut stack),
            std::mem::take(&mut next),
        );
        let mut comps = Vec::new();
        for v in 0..n {
            if st.0[v] == usize::MAX {
                visit(v, &edges, &mut st, &mut comps);
            }
        }
        let name = |i: usize| {
            let p = &self.files[i].path;
            p.strip_prefix(workspace())
                .unwrap_or(p)
                .display()
                .to_string()
        };
        for c in comps {
            let mut ties: Vec<String> = Vec::new();
            for &a in &c {
                for (b, why) in edges.get(&a).into_iter().flatten() {
                    if c.contains(b) {
                        ties.push(format!("{} -> {} ({why})", name(a), name(*b)));
                    }
                }
            }
            ties.sort();
            out.push(ties);
        }
        out
    }
}

/// The workspace root (`FEDCDD_CYCLES_ROOT` checks another checkout).
fn workspace() -> PathBuf {
    let p = std::env::var_os("FEDCDD_CYCLES_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    p.canonicalize().unwrap_or(p)
}

#[test]
fn no_crate_has_an_import_circle() {
    let root = workspace();
    let mut found = Vec::new();
    for krate in ["core", "kernels", "host", "ffi", "nostd-check", "tests"] {
        let src = root.join(krate).join("src");
        let c = Crate::new(&src);
        assert!(!c.files.is_empty(), "no sources read in {}", src.display());
        for circle in c.circles() {
            found.push(format!("{krate}:\n  {}", circle.join("\n  ")));
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

/// A throwaway crate on disk.
fn scratch(files: &[(&str, &str)]) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fedcdd-cycles-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

#[test]
fn the_checker_sees_circles_through_uses_reexports_and_inline_paths() {
    // a uses b directly, b reaches a through the parent's re-export: a circle.
    let dir = scratch(&[
        ("lib.rs", "mod a;\nmod b;\npub use a::Thing;\n"),
        ("a.rs", "use crate::b::other;\npub struct Thing;\n"),
        (
            "b.rs",
            "pub fn other() -> crate::Thing { crate::Thing }\n// crate::nothing\n",
        ),
    ]);
    let circles = Crate::new(&dir).circles();
    assert_eq!(circles.len(), 1, "{circles:?}");
    assert_eq!(circles[0].len(), 2, "{circles:?}");
    // The same shape without the back edge (b names the type only in a comment and a
    // string): no circle.
    let dir2 = scratch(&[
        ("lib.rs", "mod a;\nmod b;\npub use a::Thing;\n"),
        ("a.rs", "use crate::b::other;\npub struct Thing;\n"),
        (
            "b.rs",
            "/// [`crate::Thing`]\npub fn other() -> &'static str { \"crate::Thing\" }\n",
        ),
    ]);
    assert!(Crate::new(&dir2).circles().is_empty());
    // A child that imports a sibling through `super` while the parent's mod.rs re-exports
    // both is not a circle; a child importing an item the parent itself defines, while the
    // parent calls into the child, is one.
    let dir3 = scratch(&[
        ("lib.rs", "mod m;\n"),
        ("m/mod.rs", "mod x;\nmod y;\npub use x::X;\npub use y::Y;\n"),
        ("m/x.rs", "use super::y::Y;\npub struct X(Y);\n"),
        ("m/y.rs", "pub struct Y;\n"),
    ]);
    assert!(Crate::new(&dir3).circles().is_empty());
    let dir4 = scratch(&[
        ("lib.rs", "mod m;\n"),
        (
            "m/mod.rs",
            "mod x;\npub struct P;\nfn f() { x::g() }\nuse self::x::g as _g;\n",
        ),
        ("m/x.rs", "use super::P;\npub fn g() {}\n"),
    ]);
    assert_eq!(Crate::new(&dir4).circles().len(), 1);
    // `super` inside an inline module names the file's own module.
    let dir6 = scratch(&[
        ("lib.rs", "mod a;\nmod b;\npub trait T {}\n"),
        (
            "a.rs",
            "use crate::b::B;\npub trait V {}\nmod inner {\n    use super::V;\n}\n",
        ),
        ("b.rs", "pub struct B;\n"),
    ]);
    assert!(Crate::new(&dir6).circles().is_empty());
    let _ = std::fs::remove_dir_all(dir6);
    // Test-only modules do not count.
    let dir5 = scratch(&[
        ("lib.rs", "mod a;\nmod b;\n"),
        ("a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "b.rs",
            "pub struct B;\n#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\n",
        ),
    ]);
    assert!(Crate::new(&dir5).circles().is_empty());
    for d in [dir, dir2, dir3, dir4, dir5] {
        let _ = std::fs::remove_dir_all(d);
    }
}

//! `hookyard deploy [DIR]`: sends a functions project's JavaScript and TypeScript files
//! to the API, which compiles and stores them, and prints what changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hookyard_functions::compile::{is_declaration, is_module};

use crate::client::{ApiArgs, Client};

#[derive(clap::Args)]
pub struct DeployArgs {
    /// The project folder: syncs at {integration}/syncs/{name}.js (or .ts), actions at {integration}/actions/, event functions at {integration}/on-events/, an optional index.js (or index.ts).
    #[arg(default_value = ".")]
    dir: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
}

/// Deploys and prints the changes; the error says what to fix.
pub async fn run(args: DeployArgs) -> Result<(), String> {
    let (files, tests) = collect(&args.dir)?;
    if files.is_empty() {
        return Err(format!("{} holds no .js or .ts files to deploy", args.dir.display()));
    }
    let body = Client::new(args.api.clone())?
        .call(
            reqwest::Method::POST,
            "/functions/deploy",
            Some(&serde_json::json!({ "files": files })),
        )
        .await
        .map_err(|e| format!("deploy {e}"))?;
    let changes = body["data"]["changes"].as_array().cloned().unwrap_or_default();
    println!("deployed {} file(s) from {}", files.len(), args.dir.display());
    if !tests.is_empty() {
        println!("  left out {} test file(s): {}", tests.len(), tests.join(", "));
    }
    for change in &changes {
        println!(
            "  {:<9} {}/{} v{}",
            change["change"].as_str().unwrap_or("?"),
            change["integration"].as_str().unwrap_or("?"),
            change["name"].as_str().unwrap_or("?"),
            change["version"]
        );
    }
    Ok(())
}

/// The project's source files, by path relative to `dir`: JavaScript and TypeScript
/// (not declaration files: nothing in them runs), outside `node_modules` and hidden
/// folders; and the test files left out (see [`is_test`]).
pub(crate) fn collect(dir: &Path) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
    let mut files = BTreeMap::new();
    let mut tests = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).map_err(|e| format!("cannot read {}: {e}", folder.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", folder.display()))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !(name.starts_with('.') || name == "node_modules") {
                    pending.push(path);
                }
                continue;
            }
            if !is_module(&name) || is_declaration(&name) {
                continue;
            }
            let relative = path
                .strip_prefix(dir)
                .map_err(|e| e.to_string())?
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            if is_test(&name) {
                tests.push(relative);
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            files.insert(relative, text);
        }
    }
    tests.sort();
    Ok((files, tests))
}

/// A test, or a test runner's configuration (`contacts.test.ts`, `x.spec.js`,
/// `vitest.setup.ts`): they import what functions cannot (`vitest`), and a deploy has
/// no use for them.
fn is_test(name: &str) -> bool {
    name.contains(".test.") || name.contains(".spec.") || name.starts_with("vitest.") || name.starts_with("jest.")
}

//! TypeScript, deployed by erasing its types: every type annotation, interface, type
//! import and the like is replaced by blanks, and nothing else moves, so a line and
//! column in an error or a stack trace are the same in the TypeScript the author wrote.
//! Types are not checked (run `tsc --noEmit` for that), and what has a runtime meaning
//! of its own (`enum`, `namespace`, parameter properties) is refused, as Node.js does
//! when it strips types.

use std::sync::{Arc, Mutex};

use swc_common::errors::{DiagnosticBuilder, Emitter, Handler};
use swc_common::sync::Lrc;
use swc_common::{BytePos, SourceMap};
use swc_ts_fast_strip::{operate, ErrorCode, Mode, Options};

/// Type declarations of the `nango` module and the sandbox's globals, for checking a
/// functions project with `tsc` (`hookyard types`).
pub const DECLARATIONS: &str = include_str!("js/nango.d.ts");

/// Whether `path` is a TypeScript module.
pub fn is_typescript(path: &str) -> bool {
    path.ends_with(".ts") || path.ends_with(".mts")
}

/// The largest TypeScript module deployed (a webhook function's are far smaller).
pub const MAX_TYPESCRIPT_BYTES: usize = 1 << 20;

/// Stack for erasing types, per byte of source. The stripper recurses once per level of
/// nesting (its parser grows its own stack, its walk over the syntax tree does not): a
/// level took up to ~3.2 KiB in a debug build, and needs at least one byte of source. So
/// a file, however it nests, cannot overflow a stack of this much per byte, where the
/// 2 MiB a thread gets by default overflowed at a thousand nested parentheses and aborted the
/// process.
const STACK_PER_BYTE: usize = 4 << 10;

/// The JavaScript of a TypeScript module, or why its types cannot be erased: one line per
/// problem, `line:column: message`, then what to write instead.
pub fn strip_types(path: &str, source: &str) -> Result<String, String> {
    if source.len() > MAX_TYPESCRIPT_BYTES {
        return Err(format!(
            "the file holds {} bytes; a TypeScript module may hold {MAX_TYPESCRIPT_BYTES} (split it, or deploy it as JavaScript)",
            source.len()
        ));
    }
    // A thread of its own, with the stack the source can need; only what the walk
    // touches is ever mapped in.
    let (path, source) = (path.to_string(), source.to_string());
    std::thread::Builder::new()
        .name("strip-types".into())
        .stack_size((8 << 20) + STACK_PER_BYTE * source.len())
        .spawn(move || strip_on_this_thread(&path, source))
        .map_err(|e| format!("cannot start erasing types: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("erasing the types failed on this file (the stripper panicked)".into()))
}

fn strip_on_this_thread(path: &str, source: String) -> Result<String, String> {
    let map: Lrc<SourceMap> = Default::default();
    let problems = Problems::default();
    let handler = Handler::with_emitter(false, false, Box::new(problems.clone()));
    let options = Options {
        module: Some(true),
        filename: Some(path.to_string()),
        mode: Mode::StripOnly,
        ..Default::default()
    };
    let error = match operate(&map, &handler, source, options) {
        Ok(output) => return Ok(output.code),
        Err(error) => error,
    };
    let mut lines: Vec<String> = problems
        .0
        .lock()
        .expect("diagnostics lock")
        .iter()
        .map(|problem| match problem.at {
            Some(at) => {
                let position = map.lookup_char_pos(at);
                format!("{}:{}: {}", position.line, position.col.0 + 1, problem.message)
            }
            None => problem.message.clone(),
        })
        .collect();
    if lines.is_empty() {
        lines.push(error.message.clone());
    }
    if matches!(error.code, ErrorCode::UnsupportedSyntax) {
        lines.push(
            "(TypeScript is deployed by erasing its types, so only syntax with no runtime meaning of \
             its own is taken: for an enum write a const object or a union of literals, for a \
             namespace a module, for a parameter property an assignment in the constructor)"
                .into(),
        );
    }
    Err(lines.join("\n"))
}

/// One diagnostic of a strip: where (in the source map) and what.
struct Problem {
    at: Option<BytePos>,
    message: String,
}

/// The diagnostics of one strip.
#[derive(Clone, Default)]
struct Problems(Arc<Mutex<Vec<Problem>>>);

impl Emitter for Problems {
    fn emit(&mut self, diagnostic: &mut DiagnosticBuilder<'_>) {
        self.0.lock().expect("diagnostics lock").push(Problem {
            at: diagnostic.span.primary_span().map(|span| span.lo),
            message: diagnostic.message(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_blanked_and_everything_else_stays_in_place() {
        let source = "import type { A } from './a';\nconst x: number = 1 as number;\nexport function f(a?: string): A { return a!; }\n";
        let stripped = strip_types("s.ts", source).unwrap();
        assert_eq!(stripped.len(), source.len(), "{stripped}");
        assert_eq!(stripped.lines().count(), source.lines().count());
        assert!(
            !stripped.contains("number") && !stripped.contains("import"),
            "{stripped}"
        );
        assert!(
            stripped.lines().nth(2).unwrap().starts_with("export function f(a"),
            "{stripped}"
        );
    }

    #[test]
    fn deep_nesting_is_erased_without_overflowing_and_huge_files_are_refused() {
        // Each of these aborted the process on the default stack.
        for (kind, source) in [
            (
                "parentheses",
                format!("const x: number = {}1{};", "(".repeat(30_000), ")".repeat(30_000)),
            ),
            ("a chain", format!("const x: boolean = {}1 as any;", "!".repeat(60_000))),
            ("unclosed", format!("let y: string = {}", "[".repeat(60_000))),
        ] {
            let result = strip_types("deep.ts", &source);
            match kind {
                "unclosed" => assert!(result.is_err(), "{kind}"),
                _ => assert_eq!(result.map(|code| code.len()), Ok(source.len()), "{kind}"),
            }
        }
        let huge = format!("const x: string = '{}';", "x".repeat(MAX_TYPESCRIPT_BYTES));
        let error = strip_types("huge.ts", &huge).unwrap_err();
        assert!(error.contains("a TypeScript module may hold 1048576"), "{error}");
    }

    #[test]
    fn what_cannot_be_erased_is_refused_at_its_line_and_column() {
        let error = strip_types("s.ts", "const a = 1;\n  enum Colour { Red }\n").unwrap_err();
        assert!(error.starts_with("2:3: TypeScript enum is not supported"), "{error}");
        assert!(error.contains("for an enum write a const object"), "{error}");

        let error = strip_types("s.ts", "let y: number = ;\n").unwrap_err();
        assert!(error.starts_with("1:17: Expression expected"), "{error}");
        assert!(!error.contains("erasing"), "{error}");
    }
}

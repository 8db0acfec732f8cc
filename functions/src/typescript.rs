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

/// The JavaScript of a TypeScript module, or why its types cannot be erased: one line per
/// problem, `line:column: message`, then what to write instead.
pub fn strip_types(path: &str, source: &str) -> Result<String, String> {
    let map: Lrc<SourceMap> = Default::default();
    let problems = Problems::default();
    let handler = Handler::with_emitter(false, false, Box::new(problems.clone()));
    let options = Options {
        module: Some(true),
        filename: Some(path.to_string()),
        mode: Mode::StripOnly,
        ..Default::default()
    };
    let error = match operate(&map, &handler, source.to_string(), options) {
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
    fn what_cannot_be_erased_is_refused_at_its_line_and_column() {
        let error = strip_types("s.ts", "const a = 1;\n  enum Colour { Red }\n").unwrap_err();
        assert!(error.starts_with("2:3: TypeScript enum is not supported"), "{error}");
        assert!(error.contains("for an enum write a const object"), "{error}");

        let error = strip_types("s.ts", "let y: number = ;\n").unwrap_err();
        assert!(error.starts_with("1:17: Expression expected"), "{error}");
        assert!(!error.contains("erasing"), "{error}");
    }
}

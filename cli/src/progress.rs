//! Progress bars for long commands (`replay`, `reseal`): drawn on a terminal's stderr,
//! hidden when stderr is a pipe or a file (a log would fill with redraws).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of unknown length in `template`'s style; and whether it is drawn (a hidden bar
/// prints nothing, not even its `println`s).
pub fn bar(template: &str) -> (ProgressBar, bool) {
    let terminal = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        None,
        if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
    (bar, terminal)
}

//! A sync's `frequency`, written as Nango writes it: `every hour`, `every 5 minutes`,
//! `every half hour`, `every day`, `every 30s`, `1h`, `2 hours`, …

use std::time::Duration;

/// Runs more often than this would hammer the provider's API for little gain.
pub const MIN_FREQUENCY: Duration = Duration::from_secs(30);

/// Parses a frequency; the message says what is accepted.
pub fn parse_frequency(text: &str) -> Result<Duration, String> {
    let normalised = text.trim().to_ascii_lowercase();
    let body = normalised.strip_prefix("every").map(str::trim).unwrap_or(&normalised);
    let duration = match body {
        "half hour" | "half an hour" => Some(Duration::from_secs(30 * 60)),
        "quarter hour" | "quarter of an hour" => Some(Duration::from_secs(15 * 60)),
        _ => amount_and_unit(body),
    }
    .ok_or_else(|| {
        format!(
            "frequency {text:?} is not understood: write it like \"every hour\", \"every 5 minutes\", \
             \"every half hour\", \"every day\" or \"30m\""
        )
    })?;
    if duration < MIN_FREQUENCY {
        return Err(format!(
            "frequency {text:?} is more often than every {} seconds, the shortest allowed",
            MIN_FREQUENCY.as_secs()
        ));
    }
    Ok(duration)
}

/// `5 minutes`, `5minutes`, `5m`, `minute` (one), `1.5h` is not accepted.
fn amount_and_unit(body: &str) -> Option<Duration> {
    let digits = body.find(|c: char| !c.is_ascii_digit()).unwrap_or(body.len());
    let (amount, unit) = body.split_at(digits);
    let amount: u64 = if amount.is_empty() { 1 } else { amount.parse().ok()? };
    let unit = unit.trim();
    let seconds = match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 7 * 86_400,
        _ => return None,
    };
    amount.checked_mul(seconds).filter(|s| *s > 0).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nango_frequencies() {
        let cases = [
            ("every hour", 3600),
            ("every 5 minutes", 300),
            ("every half hour", 1800),
            ("every day", 86_400),
            ("every 30s", 30),
            ("1h", 3600),
            ("30m", 1800),
            ("Every 2 Hours", 7200),
            ("every week", 604_800),
            ("every 1 minute", 60),
        ];
        for (text, seconds) in cases {
            assert_eq!(parse_frequency(text), Ok(Duration::from_secs(seconds)), "{text}");
        }
    }

    #[test]
    fn too_often_or_unreadable() {
        assert!(parse_frequency("every 10s").unwrap_err().contains("shortest allowed"));
        assert!(parse_frequency("every 29 seconds").is_err());
        for bad in [
            "",
            "every",
            "soon",
            "every 0 minutes",
            "1.5h",
            "every -5 minutes",
            "5 fortnights",
        ] {
            assert!(parse_frequency(bad).unwrap_err().contains("not understood"), "{bad}");
        }
    }
}

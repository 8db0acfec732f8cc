//! Names that end up in NATS subjects and URLs. They can only hold values that are
//! safe there, so no stage has to check them again.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} is invalid: use 1 to 64 characters from a-z, A-Z, 0-9, '-' and '_'")]
pub struct InvalidKey {
    kind: &'static str,
    value: String,
}

fn is_subject_token(value: &str) -> bool {
    (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

macro_rules! subject_key {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidKey;
            fn from_str(value: &str) -> Result<Self, InvalidKey> {
                Self::try_from(value.to_string())
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidKey;
            fn try_from(value: String) -> Result<Self, InvalidKey> {
                if is_subject_token(&value) {
                    Ok($name(value))
                } else {
                    Err(InvalidKey { kind: $kind, value })
                }
            }
        }

        impl From<$name> for String {
            fn from(key: $name) -> String {
                key.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

subject_key!(
    /// An environment's name (`dev`, `prod`); a token of the `hooks.*` subjects.
    EnvironmentName,
    "environment name"
);
subject_key!(
    /// An integration's unique key within its environment (Nango's provider config key).
    IntegrationKey,
    "integration key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_tokens_only() {
        for good in ["dev", "github-app", "hub_spot2", &"a".repeat(64)] {
            assert!(good.parse::<IntegrationKey>().is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a*", ">", "a b", "ünï", &"a".repeat(65)] {
            let err = bad.parse::<IntegrationKey>().unwrap_err();
            assert!(err.to_string().contains("integration key"), "{err}");
        }
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<EnvironmentName>("\"prod\"").is_ok());
        assert!(serde_json::from_str::<EnvironmentName>("\"pr.od\"").is_err());
    }
}

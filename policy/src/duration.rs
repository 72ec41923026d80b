//! Durations as operators write them: `90s`, `10m`, `12h`, `30d`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A non-negative whole number of seconds, written with a unit suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyDuration(u64);

impl PolicyDuration {
    pub const fn from_secs(secs: u64) -> Self {
        PolicyDuration(secs)
    }

    pub const fn as_secs(self) -> u64 {
        self.0
    }
}

impl FromStr for PolicyDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?} has no unit: write e.g. 90s, 10m, 12h or 30d"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration: write e.g. 90s, 10m, 12h or 30d"))?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
        };
        n.checked_mul(mult)
            .map(PolicyDuration)
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl fmt::Display for PolicyDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s != 0 && s.is_multiple_of(86_400) {
            write!(f, "{}d", s / 86_400)
        } else if s != 0 && s.is_multiple_of(3_600) {
            write!(f, "{}h", s / 3_600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for PolicyDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PolicyDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_forms() {
        for (s, secs) in [
            ("90s", 90),
            ("10m", 600),
            ("12h", 43_200),
            ("30d", 2_592_000),
        ] {
            let d: PolicyDuration = s.parse().unwrap();
            assert_eq!(d.as_secs(), secs);
            assert_eq!(d.to_string(), s);
        }
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        for s in ["", "30", "d", "3w", "-1d", "1.5d", "99999999999999999999d"] {
            assert!(s.parse::<PolicyDuration>().is_err(), "{s}");
        }
    }
}

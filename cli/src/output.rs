//! How commands print: human lines on stdout unless `-q`, or one JSON object per line with
//! `--json`, and byte counts in units people read.

use serde::Serialize;

/// Where a command's results go.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `-q`: print nothing but errors.
    pub quiet: bool,
}

impl Output {
    /// A line for people.
    pub fn line(&self, text: impl AsRef<str>) {
        if !self.quiet {
            println!("{}", text.as_ref());
        }
    }

    /// One JSON object on its own line, for scripts; printed even with `-q`.
    pub fn json(&self, value: &impl Serialize) {
        println!(
            "{}",
            serde_json::to_string(value).expect("report types serialize")
        );
    }
}

/// `1536` → `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses `512M`, `10G`, `1.5T` or a plain byte count (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => {
                    return Err(format!(
                        "unknown size unit {other:?} in {s:?}: use K, M, G or T"
                    ))
                }
            };
            (&s[..i], mult)
        }
    };
    let value: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 10G"))?;
    if value.is_nan() || value < 0.0 {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn bytes_print_readably() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}

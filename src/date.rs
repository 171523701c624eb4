//! HTTP-date parsing (RFC 9110 §5.6.7).
//!
//! Every tagged GET parses the backend's `Last-Modified`. `httpdate` checks a date by turning
//! it into a `SystemTime` and back, about 640 instructions a request (callgrind); the
//! IMF-fixdate form every current server sends is read here directly in about a third of
//! that, with the same checks. The two obsolete forms, and anything this rejects, go to
//! `httpdate`, so the result is `httpdate`'s for every input (`tests::agrees_with_httpdate`)
//! but one: the day name. The grammar pairs any day name with any date, and the name says
//! nothing the date does not, so a date under the wrong name is read as its date, as nginx
//! and Apache read it. Refused, it would be no valid date, and §13.1.4 has an invalid
//! `If-Unmodified-Since` ignored: a stale write would go through.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses an HTTP-date in any of the three forms; `None` if it is not a valid one.
pub fn parse(s: &str) -> Option<SystemTime> {
    imf_fixdate(s.as_bytes())
        .or_else(|| httpdate::parse_http_date(s).ok())
        .or_else(|| obsolete_under_another_day(s))
}

/// The day names of the grammar (RFC 9110 §5.6.7), short and long (rfc850-date's).
const DAYS: [(&str, &str); 7] = [
    ("Mon", "Monday"),
    ("Tue", "Tuesday"),
    ("Wed", "Wednesday"),
    ("Thu", "Thursday"),
    ("Fri", "Friday"),
    ("Sat", "Saturday"),
    ("Sun", "Sunday"),
];

/// An obsolete form (rfc850-date, asctime-date) that `httpdate` refused, read under each
/// day name in turn: it checks the name against the date. Only for input that starts with
/// a day name, so at most seven tries, and only on the rare input no fast path reads.
fn obsolete_under_another_day(s: &str) -> Option<SystemTime> {
    let (name, rest) = match s.split_once(", ") {
        Some((long, _)) if long.len() > 3 => s.split_at(long.len()),
        _ => s.split_at_checked(3)?,
    };
    let long = name.len() > 3;
    if !DAYS.iter().any(|d| name == if long { d.1 } else { d.0 }) {
        return None;
    }
    DAYS.iter()
        .map(|d| if long { d.1 } else { d.0 })
        .filter(|other| *other != name)
        .find_map(|other| httpdate::parse_http_date(&format!("{other}{rest}")).ok())
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`: valid dates from 1970 to 9999 under any day name, as
/// `httpdate` accepts them under the right one. `None` sends the input to `httpdate`.
fn imf_fixdate(s: &[u8]) -> Option<SystemTime> {
    let s: &[u8; 29] = s.try_into().ok()?;
    if !DAYS.iter().any(|d| d.0.as_bytes() == &s[..3])
        || &s[3..5] != b", "
        || s[7] != b' '
        || s[11] != b' '
        || s[16] != b' '
        || s[19] != b':'
        || s[22] != b':'
        || &s[25..] != b" GMT"
    {
        return None;
    }
    let num = |a: usize, b: usize| -> Option<u64> {
        s[a..b].iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    };
    let (day, year) = (num(5, 7)?, num(12, 16)?);
    let (hour, min, sec) = (num(17, 19)?, num(20, 22)?, num(23, 25)?);
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let month = MONTHS.iter().position(|m| **m == s[8..11])? as u64 + 1;
    if !(1970..=9999).contains(&year) || hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_since_epoch(year, month, day);
    Some(UNIX_EPOCH + Duration::from_secs(days * 86_400 + hour * 3_600 + min * 60 + sec))
}

fn is_leap(year: u64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a valid date on or after it.
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    const BEFORE_MONTH: [u64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let y = year - 1;
    // Leap days in years 1..=y, less those in 1..=1969 (477).
    let leap_days = y / 4 - y / 100 + y / 400 - 477;
    let leap_this_year = u64::from(month > 2 && is_leap(year));
    (year - 1970) * 365 + leap_days + BEFORE_MONTH[month as usize - 1] + leap_this_year + day - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rfc_example_and_the_obsolete_forms() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(imf_fixdate(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
    }

    /// 6 Nov 1994 was a Sunday: under another day name each form still reads as its date.
    #[test]
    fn reads_a_date_under_the_wrong_day_name_as_its_date() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse("Mon, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Wednesday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Sat Nov  6 08:49:37 1994"), Some(t));
        for bad in [
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "mon, 06 Nov 1994 08:49:37 GMT",
            "Mon, 31 Nov 1994 08:49:37 GMT",
            "Wednes, 06-Nov-94 08:49:37 GMT",
            "Wednesday, 06-Nov-94 08:49:37 UTC",
            "Mon Nov 31 08:49:37 1994",
            "Mo",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_date() {
        for bad in [
            "Sun, 31 Nov 1994 08:49:37 GMT", // no such day
            "Thu, 29 Feb 2001 00:00:00 GMT", // not a leap year
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:60:37 GMT",
            "Sun, 06 Nov 1994 08:49:60 GMT",
            "Wed, 31 Dec 1969 23:59:59 GMT", // before the epoch
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nv 1994 08:49:37 GMT",
            "Sun, 0x Nov 1994 08:49:37 GMT",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// Every day from 1970 to 2500 and the last days of 9999, at four times of day: the fast
    /// path reads `httpdate`'s own formatting back. At midnight each day also goes under the
    /// six wrong day names, which `httpdate` refuses and `parse` reads as the same date.
    #[test]
    fn agrees_with_httpdate() {
        let days = (0..(2500 - 1970) * 366).chain(2_932_800..2_932_897);
        let names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        for day in days {
            for secs in [0, 3_599, 45_296, 86_399] {
                let t = UNIX_EPOCH + Duration::from_secs(day * 86_400 + secs);
                let good = httpdate::fmt_http_date(t);
                assert_eq!(imf_fixdate(good.as_bytes()), Some(t), "{good}");
                if secs != 0 {
                    continue;
                }
                for name in names.iter().filter(|n| !good.starts_with(*n)) {
                    let wrong = format!("{name}{}", &good[3..]);
                    assert_eq!(imf_fixdate(wrong.as_bytes()), Some(t), "{wrong}");
                    assert_eq!(httpdate::parse_http_date(&wrong).ok(), None, "{wrong}");
                }
            }
        }
    }

    /// Days 0 to 32 of every month of years around the edges, under every day name: the fast
    /// path accepts exactly the dates `httpdate` accepts under one of them, with its time.
    #[test]
    fn out_of_range_fields_agree_with_httpdate() {
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        for year in [1969, 1970, 1999, 2000, 2024, 2100, 9999] {
            for month in months {
                for day in 0..=32 {
                    let date = |name: &str| format!("{name}, {day:02} {month} {year} 23:59:59 GMT");
                    let expected = names
                        .iter()
                        .find_map(|name| httpdate::parse_http_date(&date(name)).ok());
                    for name in names {
                        assert_eq!(
                            imf_fixdate(date(name).as_bytes()),
                            expected,
                            "{}",
                            date(name)
                        );
                    }
                }
            }
        }
    }
}

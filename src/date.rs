//! HTTP-date parsing (RFC 9110 §5.6.7).
//!
//! Every tagged GET parses the backend's `Last-Modified`. `httpdate` checks a date by turning
//! it into a `SystemTime` and back, about 640 instructions a request (callgrind); the
//! IMF-fixdate form every current server sends is read here directly in about a third of
//! that, with the same checks. The two obsolete forms, and anything this rejects, go to
//! `httpdate`, so the result is `httpdate`'s for every input (`tests::agrees_with_httpdate`)
//! but two. The day name: the grammar pairs any day name with any date, and the name says
//! nothing the date does not, so a date under the wrong name is read as its date, as nginx
//! and Apache read it. And a year before 1970, which `httpdate` cannot hold but the grammar
//! allows (`year = 4DIGIT`). Refused, either would be no valid date, and §13.1.4 has an
//! invalid `If-Unmodified-Since` ignored: a stale write would go through.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses an HTTP-date in any of the three forms; `None` if it is not a valid one.
pub fn parse(s: &str) -> Option<SystemTime> {
    imf_fixdate(s.as_bytes())
        .or_else(|| httpdate::parse_http_date(s).ok())
        .or_else(|| obsolete_under_another_day(s))
        .or_else(|| asctime_before_1970(s.as_bytes()))
}

/// `Sun Nov  6 08:49:37 1960`: an asctime-date `httpdate` refused, read as the IMF-fixdate
/// it spells (which `imf_fixdate` reads before 1970 too). Only for input nothing else read.
/// (An rfc850-date's two-digit year is never before 1970 as `httpdate` reads it.)
fn asctime_before_1970(s: &[u8]) -> Option<SystemTime> {
    let s: &[u8; 24] = s.try_into().ok()?;
    if s[3] != b' ' || s[7] != b' ' || s[10] != b' ' || s[19] != b' ' {
        return None;
    }
    let day = match s[8] {
        b' ' => [b'0', s[9]],
        _ => [s[8], s[9]],
    };
    let mut imf = [0u8; 29];
    imf[..3].copy_from_slice(&s[..3]);
    imf[3..5].copy_from_slice(b", ");
    imf[5..7].copy_from_slice(&day);
    imf[7] = b' ';
    imf[8..11].copy_from_slice(&s[4..7]);
    imf[11] = b' ';
    imf[12..16].copy_from_slice(&s[20..24]);
    imf[16] = b' ';
    imf[17..25].copy_from_slice(&s[11..19]);
    imf[25..].copy_from_slice(b" GMT");
    imf_fixdate(&imf)
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
/// `httpdate` accepts them under the right one, and those from 0000 to 1969 that it cannot
/// hold (proleptic Gregorian, as the grammar's calendar). `None` sends the input to
/// `httpdate`.
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
    if hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let time = hour * 3_600 + min * 60 + sec;
    if year < 1970 {
        // Before the epoch (at least a day, so more than `time`): rare, and off the path
        // every current server's date takes.
        let before = days_from_year_0(1970, 1, 1) - days_from_year_0(year, month, day);
        return Some(UNIX_EPOCH - Duration::from_secs(before * 86_400 - time));
    }
    let days = days_since_epoch(year, month, day);
    Some(UNIX_EPOCH + Duration::from_secs(days * 86_400 + time))
}

/// A UTC time from its fields, on or after 1970; `None` if a field is out of its range.
pub(crate) fn utc(year: u64, month: u64, day: u64, hms: (u64, u64, u64)) -> Option<SystemTime> {
    let (h, m, s) = hms;
    let valid = year >= 1970
        && (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && h < 24
        && m < 60
        && s < 60;
    valid.then(|| {
        let days = days_since_epoch(year, month, day);
        UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + m * 60 + s)
    })
}

/// Days from 0000-01-01 (proleptic Gregorian; year 0 is a leap year) to a valid date.
fn days_from_year_0(year: u64, month: u64, day: u64) -> u64 {
    // Leap days in years 0..year: year 0's, and those in 1..=year-1.
    let leap_days = match year.checked_sub(1) {
        Some(y) => 1 + y / 4 - y / 100 + y / 400,
        None => 0,
    };
    let leap_this_year = u64::from(month > 2 && is_leap(year));
    year * 365 + leap_days + BEFORE_MONTH[month as usize - 1] + leap_this_year + day - 1
}

/// Days in the year before each month's first, in a year that is not a leap year.
const BEFORE_MONTH: [u64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];

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
            "Thu, 29 Feb 1900 00:00:00 GMT", // not a leap year either
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nv 1994 08:49:37 GMT",
            "Sun, 0x Nov 1994 08:49:37 GMT",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// The grammar's year is any four digits: a date before 1970, which `httpdate` cannot
    /// hold, is a date all the same (an `If-Unmodified-Since` of 1960 fails against any
    /// modification), not one to ignore.
    #[test]
    fn reads_dates_before_1970() {
        let before = |s: u64| Some(UNIX_EPOCH - Duration::from_secs(s));
        assert_eq!(parse("Wed, 31 Dec 1969 23:59:59 GMT"), before(1));
        assert_eq!(parse("Thu, 01 Jan 1970 00:00:00 GMT"), Some(UNIX_EPOCH));
        assert_eq!(
            parse("Mon, 01 Jan 1900 00:00:00 GMT"),
            before(2_208_988_800)
        );
        assert_eq!(
            parse("Sat, 01 Jan 0000 00:00:00 GMT"),
            before(62_167_219_200)
        );
        assert_eq!(
            parse("Sun, 29 Feb 1600 12:00:00 GMT"),
            before(11_670_955_200)
        );
        assert_eq!(parse("Wed Dec 31 23:59:59 1969"), before(1));
        assert_eq!(parse("Sat Jan  1 00:00:00 1966"), before(126_230_400));
        for bad in [
            "Mon, 29 Feb 1900 00:00:00 GMT",
            "Mon, 31 Apr 1960 00:00:00 GMT",
            "Mon Feb 29 00:00:00 1900",
            "Mon Jan  1 24:00:00 1900",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        // Day by day from 1600 to 1970, each a day after the one before, and the last the
        // day before the epoch.
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let mut last = None::<SystemTime>;
        for year in 1600..1970u64 {
            for (m, month) in months.iter().enumerate() {
                for day in 1..=days_in_month(year, m as u64 + 1) {
                    let t = parse(&format!("Mon, {day:02} {month} {year:04} 00:00:00 GMT"));
                    let t = t.unwrap_or_else(|| panic!("{year}-{month}-{day}"));
                    if let Some(last) = last {
                        assert_eq!(
                            t,
                            last + Duration::from_secs(86_400),
                            "{year}-{month}-{day}"
                        );
                    }
                    last = Some(t);
                }
            }
        }
        assert_eq!(last, before(86_400));
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
        for year in [1970, 1999, 2000, 2024, 2100, 9999] {
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

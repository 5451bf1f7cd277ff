//! MQTT lines: text cut into lines of at most [`LINE_MAX`] bytes, pieces marked with
//! [`SPLIT_MARKER`], and the counting of lines dropped before their text was built.

use super::{LINE_MAX, SPLIT_MARKER};

/// Appends `line` (lossy UTF-8, without its newline) to `out` as MQTT lines of at most
/// [`LINE_MAX`] bytes: pieces but the last end with [`SPLIT_MARKER`], and so does the last when
/// `continued`. Returns the number of lines appended.
pub fn push_line(out: &mut String, line: &str, continued: bool) -> u64 {
    push_line_within(out, line, continued, LINE_MAX)
}

/// [`push_line`] with lines of at most `max` bytes (a batch smaller than [`LINE_MAX`]).
pub fn push_line_within(out: &mut String, line: &str, continued: bool, max: usize) -> u64 {
    let room = max.saturating_sub(SPLIT_MARKER.len() + 1).max(4);
    let mut rest = line;
    let mut n = 0;
    while rest.len() > max.saturating_sub(1) || (continued && rest.len() > room) {
        let mut cut = room.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push_str(&rest[..cut]);
        out.push_str(SPLIT_MARKER);
        out.push('\n');
        rest = &rest[cut..];
        n += 1;
    }
    if !rest.is_empty() || !continued || n == 0 {
        out.push_str(rest);
        if continued {
            out.push_str(SPLIT_MARKER);
        }
        out.push('\n');
        n += 1;
    }
    n
}

/// Takes the full [`LINE_MAX`] pieces off the front of `held` (a line longer than a piece),
/// as MQTT lines ending with [`SPLIT_MARKER`]; returns them and their count. The rest stays.
pub(super) fn long_pieces(held: &mut Vec<u8>) -> (String, u64) {
    let keep = incomplete_tail(held);
    let part: Vec<u8> = held.drain(..keep).collect();
    let part = String::from_utf8_lossy(&part);
    let mut rest: &str = &part;
    let room = LINE_MAX - SPLIT_MARKER.len() - 1;
    let mut long = String::new();
    let mut n = 0;
    while rest.len() >= LINE_MAX - 1 {
        let mut cut = room;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        n += push_line(&mut long, &rest[..cut], true);
        rest = &rest[cut..];
    }
    held.splice(..0, rest.bytes());
    (long, n)
}

/// Appends the newline-terminated lines of `bytes` to `out` as [`push_line`] does, line by
/// line, and returns how many MQTT lines that made. Valid UTF-8 without a line of
/// [`LINE_MAX`] bytes or more goes in as it is.
pub(super) fn push_lines(out: &mut String, bytes: &[u8]) -> u64 {
    if bytes.is_empty() {
        return 0;
    }
    if let Ok(s) = std::str::from_utf8(bytes) {
        let mut n = 0;
        let mut start = 0;
        let mut short = true;
        for p in memchr::memchr_iter(b'\n', bytes) {
            if p - start > LINE_MAX - 1 {
                short = false;
                break;
            }
            start = p + 1;
            n += 1;
        }
        if short {
            out.push_str(s);
            return n;
        }
    }
    let mut n = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(&line[..line.len() - 1]);
        n += push_line(out, &line, false);
    }
    n
}

/// How many MQTT lines [`push_line`] makes of the newline-terminated lines of `head` followed
/// by `rest` (`head` holds no newline), without building their text when it need not.
pub(super) fn count_lines(head: &[u8], rest: &[u8]) -> u64 {
    let one = |line: &[u8]| -> u64 {
        // Lossy UTF-8 is at most three times as long as the bytes.
        if line.len() * 3 < LINE_MAX || (line.len() < LINE_MAX && std::str::from_utf8(line).is_ok())
        {
            1
        } else {
            push_line(&mut String::new(), &String::from_utf8_lossy(line), false)
        }
    };
    let mut n = 0;
    let mut start = 0;
    let mut first = true;
    for p in memchr::memchr_iter(b'\n', rest) {
        if first && !head.is_empty() {
            let mut line = head.to_vec();
            line.extend_from_slice(&rest[..p]);
            n += one(&line);
        } else {
            n += one(&rest[start..p]);
        }
        first = false;
        start = p + 1;
    }
    n
}

/// Where an incomplete UTF-8 sequence starts at the end of `data` (`data.len()` if none): a
/// leading byte followed by fewer continuation bytes than it announces.
pub(super) fn incomplete_tail(data: &[u8]) -> usize {
    let len = data.len();
    for i in (len.saturating_sub(3)..len).rev() {
        let b = data[i];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return len,
        };
        return if len - i < need { i } else { len };
    }
    len
}

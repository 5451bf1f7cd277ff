//! The pure part of an output topic: [`TopicStream`] cuts whole lines into batches, keeps a
//! bounded queue of them, drops the oldest (counted) when it overflows, and numbers what it
//! hands out (see [the batcher](super) for what `seq` and `dropped` mean). No I/O, no clock.

use std::collections::VecDeque;

/// One output message, as [`TopicStream::next_message`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    /// Its sequence number on the topic.
    pub seq: u64,
    /// Lines lost on the topic before it.
    pub dropped: u64,
    /// Whole lines (empty: the message only reports a loss).
    pub text: String,
    /// How many lines.
    pub lines: u64,
}

#[derive(Debug)]
enum Item {
    Batch(String, u64),
    Lost(u64),
}

/// The batching, dropping and numbering of one output topic (pure: no I/O, no clock).
#[derive(Debug)]
pub struct TopicStream {
    max: usize,
    cap: usize,
    /// Whole lines not yet cut into a batch.
    text: String,
    lines: u64,
    queue: VecDeque<Item>,
    batches: usize,
    next_seq: u64,
    /// Lines lost before the next message.
    dropped: u64,
    /// `dropped` of the last message handed out.
    reported: u64,
    /// A loss since the last message: the next one skips a `seq`.
    jump: bool,
    /// Lines of the batches dropped here, not yet taken by [`TopicStream::take_discarded`].
    discarded: u64,
    /// [`TopicStream::flush`] was called since the last line or loss came: a loss may be
    /// reported alone.
    flushed: bool,
}

impl TopicStream {
    /// A stream of batches of at most `max` bytes (at least 64) with at most `cap` batches
    /// waiting.
    pub fn new(max: usize, cap: usize) -> Self {
        TopicStream {
            max: max.max(64),
            cap: cap.max(1),
            text: String::new(),
            lines: 0,
            queue: VecDeque::new(),
            batches: 0,
            next_seq: 0,
            dropped: 0,
            reported: 0,
            jump: false,
            discarded: 0,
            flushed: false,
        }
    }

    /// Adds whole lines (each ending with a newline). Full batches are cut at line boundaries;
    /// a line longer than a batch is split into pieces ending with the split marker.
    pub fn push(&mut self, text: &str) {
        for line in text.split_inclusive('\n') {
            if line.len() <= self.max {
                self.add_line(line);
            } else {
                let mut pieces = String::new();
                let body = line.strip_suffix('\n').unwrap_or(line);
                crate::output::push_line_within(&mut pieces, body, false, self.max);
                for piece in pieces.split_inclusive('\n') {
                    self.add_line(piece);
                }
            }
        }
    }

    fn add_line(&mut self, line: &str) {
        self.flushed = false;
        if self.text.len() + line.len() > self.max {
            self.cut();
        }
        self.text.push_str(line);
        self.lines += 1;
    }

    /// Cuts what is waiting into a batch, and lets [`TopicStream::next_message`] report a loss that no
    /// batch follows (the timer fired, or the stream ends).
    pub fn flush(&mut self) {
        self.cut();
        self.flushed = true;
    }

    /// Cuts what is waiting into a batch (it is full, or a loss must be placed after it).
    fn cut(&mut self) {
        if self.text.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.text);
        let lines = std::mem::take(&mut self.lines);
        self.queue.push_back(Item::Batch(text, lines));
        self.batches += 1;
        while self.batches > self.cap {
            self.drop_oldest();
        }
    }

    /// `lines` were lost at this point of the stream, before they reached it.
    pub fn lose(&mut self, lines: u64) {
        if lines == 0 {
            return;
        }
        self.cut();
        self.push_lost(lines);
        self.flushed = false;
    }

    /// A message handed out earlier, holding `lines`, was lost afterwards: its `seq` is missing,
    /// and the next message counts its lines.
    pub fn evicted(&mut self, lines: u64) {
        self.dropped += lines;
    }

    fn push_lost(&mut self, lines: u64) {
        match self.queue.back_mut() {
            Some(Item::Lost(n)) => *n += lines,
            _ => self.queue.push_back(Item::Lost(lines)),
        }
    }

    fn drop_oldest(&mut self) {
        let Some(i) = self
            .queue
            .iter()
            .position(|it| matches!(it, Item::Batch(..)))
        else {
            return;
        };
        let Some(Item::Batch(_, lines)) = self.queue.remove(i) else {
            return;
        };
        self.batches -= 1;
        self.discarded += lines;
        // Put a loss record in its place, merged with its neighbours.
        let mut n = lines;
        if let Some(Item::Lost(m)) = self.queue.get(i) {
            n += m;
            self.queue.remove(i);
        }
        if i > 0 {
            if let Some(Item::Lost(m)) = self.queue.get_mut(i - 1) {
                *m += n;
                return;
            }
        }
        self.queue.insert(i, Item::Lost(n));
    }

    /// The next message to publish, if any: the oldest waiting batch, or, when nothing waits
    /// after a [`TopicStream::flush`] and a loss was not reported yet, an empty message that
    /// reports it.
    pub fn next_message(&mut self) -> Option<Out> {
        while let Some(item) = self.queue.pop_front() {
            match item {
                Item::Lost(n) => {
                    self.dropped += n;
                    self.jump = true;
                }
                Item::Batch(text, lines) => {
                    self.batches -= 1;
                    return Some(self.emit(text, lines));
                }
            }
        }
        if self.flushed && self.dropped != self.reported && self.text.is_empty() {
            return Some(self.emit(String::new(), 0));
        }
        None
    }

    fn emit(&mut self, text: String, lines: u64) -> Out {
        if self.jump {
            self.next_seq += 1;
            self.jump = false;
        }
        let out = Out {
            seq: self.next_seq,
            dropped: self.dropped,
            text,
            lines,
        };
        self.next_seq += 1;
        self.reported = self.dropped;
        out
    }

    /// Lines of the batches this stream dropped since the last call.
    pub fn take_discarded(&mut self) -> u64 {
        std::mem::take(&mut self.discarded)
    }

    /// Nothing waits and every loss was reported.
    pub fn is_idle(&self) -> bool {
        self.text.is_empty() && self.queue.is_empty() && self.dropped == self.reported
    }

    /// Whether whole lines wait for the timer.
    pub fn has_text(&self) -> bool {
        !self.text.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(from: usize, n: usize) -> String {
        (from..from + n).map(|i| format!("L{i}\n")).collect()
    }

    fn all(s: &mut TopicStream) -> Vec<Out> {
        std::iter::from_fn(|| s.next_message()).collect()
    }

    /// What a consumer can check: every line once, in order; a `seq` jump exactly where
    /// lines were lost, and `dropped` growing by exactly the lines lost there.
    fn check(outs: &[Out], total: usize) {
        let mut expect = 0usize;
        let mut last: Option<&Out> = None;
        for o in outs {
            let lost_before = o.dropped - last.map_or(0, |l| l.dropped);
            let next_seq = last.map_or(0, |l| l.seq + 1);
            if lost_before > 0 {
                assert!(o.seq > next_seq, "a loss without a seq jump at {o:?}");
            } else {
                assert_eq!(o.seq, next_seq, "a seq jump without a loss at {o:?}");
            }
            expect += lost_before as usize;
            assert_eq!(o.lines, o.text.matches('\n').count() as u64);
            for l in o.text.lines() {
                assert_eq!(l, format!("L{expect}"), "a line out of place");
                expect += 1;
            }
            last = Some(o);
        }
        assert_eq!(expect, total, "received + dropped must be every line");
    }

    #[test]
    fn batches_end_at_line_boundaries_within_the_limit() {
        let mut s = TopicStream::new(100, 1000);
        s.push(&lines(0, 1000));
        s.flush();
        let outs = all(&mut s);
        assert!(outs.len() > 40, "{} batches", outs.len());
        for o in &outs {
            assert!(o.text.len() <= 100 && o.text.ends_with('\n'), "{o:?}");
        }
        check(&outs, 1000);
        assert!(outs.iter().all(|o| o.dropped == 0));
        assert!(s.is_idle());
    }

    #[test]
    fn a_loss_is_a_seq_jump_in_its_place_and_dropped_counts_its_lines() {
        let mut s = TopicStream::new(1000, 1000);
        s.push(&lines(0, 10));
        s.lose(5);
        s.push(&lines(15, 10));
        s.flush();
        let outs = all(&mut s);
        assert_eq!(
            outs.iter()
                .map(|o| (o.seq, o.dropped, o.lines))
                .collect::<Vec<_>>(),
            [(0, 0, 10), (2, 5, 10)]
        );
        check(&outs, 25);
    }

    #[test]
    fn a_loss_at_the_end_is_reported_by_an_empty_message() {
        let mut s = TopicStream::new(1000, 1000);
        s.push(&lines(0, 3));
        s.flush();
        assert_eq!(s.next_message().unwrap().seq, 0);
        s.lose(7);
        assert!(!s.is_idle());
        assert!(
            s.next_message().is_none(),
            "a batch may still come to report it"
        );
        s.flush();
        let notice = s.next_message().unwrap();
        assert_eq!(
            (notice.seq, notice.dropped, notice.text.as_str()),
            (2, 7, "")
        );
        assert!(s.next_message().is_none());
        assert!(s.is_idle());
    }

    #[test]
    fn a_backlog_over_the_cap_drops_the_oldest_batches_whole() {
        let mut s = TopicStream::new(64, 4);
        s.push(&lines(0, 300));
        s.flush();
        let discarded = s.take_discarded();
        let outs = all(&mut s);
        // Only 4 batches wait; the lines of the others were dropped here, counted.
        assert_eq!(outs.len(), 4);
        assert!(discarded > 0);
        assert_eq!(outs[0].dropped, discarded);
        check(&outs, 300);
    }

    #[test]
    fn a_message_evicted_after_hand_off_is_counted_by_the_next() {
        let mut s = TopicStream::new(1000, 1000);
        s.push(&lines(0, 4));
        s.flush();
        let first = s.next_message().unwrap();
        s.evicted(first.lines);
        s.push(&lines(4, 2));
        s.flush();
        let next = s.next_message().unwrap();
        // Its seq follows (the evicted message's own seq is the gap), dropped counts it.
        assert_eq!((next.seq, next.dropped), (1, 4));
        s.evicted(2);
        s.flush();
        let notice = s.next_message().unwrap();
        assert_eq!((notice.seq, notice.dropped, notice.lines), (2, 6, 0));
    }

    #[test]
    fn a_line_longer_than_a_batch_is_split_with_the_marker() {
        let mut s = TopicStream::new(100, 100);
        let long = "x".repeat(250);
        s.push(&format!("{long}\nshort\n"));
        s.flush();
        let text: String = all(&mut s).into_iter().map(|o| o.text).collect();
        let got: Vec<&str> = text.lines().collect();
        let marker = crate::output::SPLIT_MARKER;
        let (short, pieces) = got.split_last().unwrap();
        assert_eq!(*short, "short");
        let (last, marked) = pieces.split_last().unwrap();
        assert!(marked.len() >= 3);
        assert!(marked.iter().all(|l| l.ends_with(marker) && l.len() < 100));
        let mut joined: String = marked
            .iter()
            .map(|l| l.strip_suffix(marker).unwrap())
            .collect();
        joined.push_str(last);
        assert_eq!(joined, long);
    }

    /// Random interleavings of output, losses at the tap, slow hand-off and evictions.
    #[test]
    fn any_mix_of_losses_keeps_the_books_exact() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let mut s = TopicStream::new(rng.usize(64..400), rng.usize(1..8));
            let mut outs = Vec::new();
            let mut n = 0;
            for _ in 0..rng.usize(1..60) {
                match rng.u8(0..10) {
                    0..=4 => {
                        let k = rng.usize(1..40);
                        s.push(&lines(n, k));
                        n += k;
                    }
                    5 => {
                        let k = rng.usize(1..40);
                        s.lose(k as u64);
                        n += k;
                    }
                    6 => s.flush(),
                    _ => {
                        for _ in 0..rng.usize(0..4) {
                            outs.extend(s.next_message());
                        }
                    }
                }
            }
            s.flush();
            outs.extend(all(&mut s));
            check(&outs, n);
        }
    }
}

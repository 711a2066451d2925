//! `multipart/form-data` bodies read as they arrive: multer's reader, driven by hand. Its input
//! is a stream that returns `Pending` until more of the body is pushed; the reader is polled
//! again after each piece (a no-op waker: nothing else can make progress), and what it found
//! comes out as [`Part`]s, so a file field goes by in pieces and is never held whole.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use multer::bytes::Bytes;

/// What of the body was fed and not read yet.
#[derive(Default)]
struct Feed {
    pieces: VecDeque<Bytes>,
    ended: bool,
}

/// multer wants a `Send` stream, hence the (uncontended) lock.
struct FeedStream(Arc<Mutex<Feed>>);

impl futures_util::Stream for FeedStream {
    type Item = std::result::Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut feed = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match feed.pieces.pop_front() {
            Some(piece) => Poll::Ready(Some(Ok(piece))),
            None if feed.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// What the reader found, in body order.
pub enum Part {
    /// A field starts.
    Field { name: Option<String>, file_name: Option<String>, content_type: Option<String> },
    /// Bytes of its value.
    Data(Bytes),
    /// It ended.
    End,
    /// The body is malformed (nothing follows).
    Error(String),
}

/// Body bytes fed without the reader finding anything (a preamble, a part's head), past which
/// the body is refused: multer would keep them all.
const MAX_UNREAD: usize = 64 << 10;

/// One body's reader: [`push`](Self::push) it the body piece by piece.
pub struct Reader {
    feed: Arc<Mutex<Feed>>,
    found: Rc<RefCell<Vec<Part>>>,
    /// Bytes fed since the reader last found something.
    unread: usize,
    /// Until it ran to the end of the body (or to an error).
    task: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

impl Reader {
    pub fn new(content_type: &str) -> std::result::Result<Self, String> {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|_| "no multipart boundary in the Content-Type".to_owned())?;
        let feed = Arc::<Mutex<Feed>>::default();
        let found = Rc::<RefCell<Vec<Part>>>::default();
        let mut multipart = multer::Multipart::new(FeedStream(feed.clone()), boundary);
        let out = found.clone();
        let task = async move {
            let read = async {
                while let Some(mut field) = multipart.next_field().await? {
                    out.borrow_mut().push(Part::Field {
                        name: field.name().map(str::to_owned),
                        file_name: field.file_name().map(str::to_owned),
                        content_type: field.content_type().map(|m| m.to_string()),
                    });
                    while let Some(chunk) = field.chunk().await? {
                        out.borrow_mut().push(Part::Data(chunk));
                    }
                    out.borrow_mut().push(Part::End);
                }
                Ok::<_, multer::Error>(())
            };
            if let Err(e) = read.await {
                out.borrow_mut().push(Part::Error(e.to_string()));
            }
        };
        Ok(Self { feed, found, unread: 0, task: Some(Box::pin(task)) })
    }

    /// Pieces pushed and not read yet (none once a push returned, unless the reader ended).
    pub fn waiting(&self) -> usize {
        self.feed().pieces.len()
    }

    fn feed(&self) -> std::sync::MutexGuard<'_, Feed> {
        self.feed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Feeds `piece` of the body (`None`: the end) and returns what that completes.
    pub fn push(&mut self, piece: Option<&[u8]>) -> Vec<Part> {
        if self.task.is_none() {
            return Vec::new(); // ended, or refused
        }
        {
            let mut feed = self.feed();
            match piece {
                Some(p) if !p.is_empty() => feed.pieces.push_back(Bytes::copy_from_slice(p)),
                Some(_) => {}
                None => feed.ended = true,
            }
        }
        if let Some(task) = self.task.as_mut() {
            if task.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_ready() {
                self.task = None;
                // What follows the closing boundary is not read.
                self.feed().pieces.clear();
            }
        }
        let mut found = std::mem::take(&mut *self.found.borrow_mut());
        self.unread = if found.is_empty() { self.unread + piece.map_or(0, <[u8]>::len) } else { 0 };
        if self.unread > MAX_UNREAD && self.task.take().is_some() {
            found.push(Part::Error(format!("no multipart field within {MAX_UNREAD} bytes")));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::{Part, Reader};

    const BODY: &[u8] = b"preamble\r\n--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\none\r\n--B\r\n\
Content-Disposition: form-data; name=\"f\"; filename=\"x.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n\
--B-not-a-boundary\r\n\r\n--B--\r\nepilogue";

    /// The fields (name, value) found when `body` is fed in pieces of `size` bytes.
    fn fields(body: &[u8], size: usize) -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut reader = Reader::new("multipart/form-data; boundary=B").unwrap();
        let mut parts = Vec::new();
        for piece in body.chunks(size) {
            parts.extend(reader.push(Some(piece)));
        }
        parts.extend(reader.push(None));
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        for part in parts {
            match part {
                Part::Field { name, .. } => out.push((name.unwrap_or_default(), Vec::new())),
                Part::Data(d) => out.last_mut().unwrap().1.extend_from_slice(&d),
                Part::End => {}
                Part::Error(why) => return Err(why),
            }
        }
        Ok(out)
    }

    #[test]
    fn any_split_of_the_body_reads_the_same() {
        let want =
            vec![("a".to_owned(), b"one".to_vec()), ("f".to_owned(), b"--B-not-a-boundary\r\n".to_vec())];
        for size in [1, 2, 3, 7, 16, 1000] {
            assert_eq!(fields(BODY, size), Ok(want.clone()), "pieces of {size}");
        }
    }

    #[test]
    fn a_body_without_fields_is_refused_before_it_is_held() {
        let junk = vec![b'j'; 200 << 10];
        let mut reader = Reader::new("multipart/form-data; boundary=B").unwrap();
        let mut refused = false;
        for piece in junk.chunks(16 << 10) {
            refused |= reader.push(Some(piece)).iter().any(|p| matches!(p, Part::Error(_)));
        }
        assert!(refused, "refused");
        assert_eq!(reader.waiting(), 0, "and nothing more is kept");
        assert!(fields(b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunterminated", 5).is_err());
    }
}

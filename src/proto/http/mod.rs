//! HTTP/1.1, sans-IO. [`server`] is one server connection as a [`StreamProtocol`]: heads parsed
//! by `httparse`, bodies framed by Content-Length or chunked coding, keep-alive and pipelining
//! (one request at a time, answered in order), the limits and timeouts of RFC 9112 and nginx,
//! and the request-smuggling shapes refused. The layer above takes complete requests and hands
//! back responses; it never sees bytes. [`client`] is the other direction, with [`decode`] for
//! compressed bodies; [`framing`] frames bodies for both. [`multipart`] reads `multipart/form-data` bodies as
//! they arrive.
//!
//! [`StreamProtocol`]: crate::proto::stream::StreamProtocol

pub mod client;
pub mod decode;
pub mod framing;
pub mod multipart;
pub mod server;
#[cfg(test)]
mod tests;

pub use server::{BodyRead, HttpLimits, HttpServerConn, Request, Response};

/// The reason phrase of a status code (RFC 9110 §15), `""` for codes it does not name.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

//! `extract_client_id` reads the client id out of a request before the WebSocket upgrade, from
//! bytes a client fully controls (query string, `X-Client-Id` header, `Cookie` headers), and
//! its answer becomes a Redis key and a log field. The lookup order comes from configuration.
//!
//! Input format, chosen so seeds and crash artefacts are readable (and because no header
//! value or request target can hold a newline, it loses nothing real): lines split on `\n`;
//! the first line is the lookup order, one source per byte (`q`, `h`, `c`; any other byte
//! `b` is source `b % 3`), may be empty or repeat sources; each later line is a field tagged
//! by its first byte: `q…` the query (when UTF-8, as `http::Uri` only hands over `&str`;
//! the last one wins), `h…` the header bytes (the last one wins), `c…` one `Cookie` header's
//! bytes (any number); lines with another tag are ignored. Example:
//!
//! ```text
//! qhc
//! qa=1&client=alice
//! hbob
//! cx=1; tether_sid=carol
//! ```
//!
//! Asserted, for any query (a `&str`, as `http::Uri` hands it over), header bytes, cookie
//! header bytes and lookup order (sources may repeat or be missing):
//! - it returns instead of panicking;
//! - `Ok(Some(id))`: `id` passes `validate_client_id` and is a substring of one of the inputs
//!   (the id is cut out of what the client sent, never made up);
//! - `Ok(None)`: no source in the order carries an id;
//! - `Err(_)`: some source in the order does carry one (an error is about something sent).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::id::{cookie_value, extract_client_id, query_param, validate_client_id, IdSource, SESSION_COOKIE};

/// One request's id sources, cut out of the fuzz input.
#[derive(Debug, Default)]
struct Request<'a> {
    order: Vec<IdSource>,
    query: Option<&'a str>,
    header: Option<&'a [u8]>,
    cookies: Vec<&'a [u8]>,
}

impl<'a> Request<'a> {
    fn parse(data: &'a [u8]) -> Self {
        let mut lines = data.split(|&b| b == b'\n');
        let order = lines
            .next()
            .unwrap_or_default()
            .iter()
            .map(|&b| match b {
                b'q' => IdSource::Query,
                b'h' => IdSource::Header,
                b'c' => IdSource::Cookie,
                _ => [IdSource::Query, IdSource::Header, IdSource::Cookie][usize::from(b % 3)],
            })
            .collect();
        let mut req = Request { order, ..Request::default() };
        for line in lines {
            match line.split_first() {
                Some((b'q', rest)) => req.query = std::str::from_utf8(rest).ok(),
                Some((b'h', rest)) => req.header = Some(rest),
                Some((b'c', rest)) => req.cookies.push(rest),
                _ => {}
            }
        }
        req
    }

    /// Whether `source` holds an id at all, valid or not (read with the public helpers).
    fn carries(&self, source: &IdSource) -> bool {
        match source {
            IdSource::Query => self.query.and_then(|q| query_param(q, "client")).is_some(),
            IdSource::Header => self.header.is_some(),
            IdSource::Cookie => self.cookies.iter().any(|c| cookie_value(c, SESSION_COOKIE).is_some()),
            // Never drawn into `order` above: a token's sub is base64 inside the input, which
            // the "appears in an input" check below cannot see (proto's unit and property
            // tests cover the token source).
            IdSource::Token => false,
        }
    }

    fn inputs(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.query.map(str::as_bytes).into_iter().chain(self.header).chain(self.cookies.iter().copied())
    }
}

fuzz_target!(|data: &[u8]| {
    let req = Request::parse(data);
    match extract_client_id(req.query, req.header, None, req.cookies.iter().copied(), &req.order) {
        Ok(Some(id)) => {
            if let Err(e) = validate_client_id(&id) {
                panic!("extracted id {id:?} is invalid ({e}) from {req:?}");
            }
            assert!(
                req.inputs().any(|input| contains(input, id.as_bytes())),
                "extracted id {id:?} appears in no input of {req:?}"
            );
        }
        Ok(None) => {
            assert!(!req.order.iter().any(|s| req.carries(s)), "no id found, yet a source carries one: {req:?}")
        }
        Err(e) => {
            assert!(req.order.iter().any(|s| req.carries(s)), "error `{e}` though no source carries an id: {req:?}")
        }
    }
});

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

//! Query strings, read the one way every process reads them (client ids, tokens).

/// The raw value of query parameter `name`. Ids and tokens never need percent-encoding (their
/// alphabets are URL-safe), so a value containing `%` is returned as-is and then fails
/// validation.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

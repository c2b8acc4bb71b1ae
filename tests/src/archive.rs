//! The raw archive read back from S3, for the archive tests and the chaos run.

use std::collections::BTreeMap;
use std::io::Read;

use ingest::archive::provision::s3_client;

/// Every line of every object in `bucket` (gunzipped when gzip), counted.
/// `endpoint`: S3 somewhere else than the environment says (AWS_ENDPOINT_URL).
pub async fn archived_lines(bucket: &str, endpoint: Option<&str>) -> BTreeMap<Vec<u8>, usize> {
    let mut lines = BTreeMap::new();
    for_each_archived_line(bucket, endpoint, |line| {
        *lines.entry(line.to_vec()).or_default() += 1;
    })
    .await;
    lines
}

/// Calls `each` with every line of every object in `bucket` (gunzipped
/// when gzip), one object in memory at a time: for archives too large to
/// hold (a long chaos run).
pub async fn for_each_archived_line(
    bucket: &str,
    endpoint: Option<&str>,
    mut each: impl FnMut(&[u8]),
) {
    let mut config = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(endpoint) = endpoint {
        config = config.endpoint_url(endpoint);
    }
    let shared = config.load().await;
    let s3 = s3_client(&shared);
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token)
            .send()
            .await
            .expect("list");
        for object in page.contents() {
            let key = object.key().expect("a key");
            let body = s3
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .expect("get")
                .body
                .collect()
                .await;
            let mut data = body.expect("body").into_bytes().to_vec();
            if data.starts_with(&[0x1f, 0x8b]) {
                let mut plain = Vec::new();
                flate2::read::MultiGzDecoder::new(&data[..])
                    .read_to_end(&mut plain)
                    .expect("gzip");
                data = plain;
            }
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                each(line);
            }
        }
        token = page.next_continuation_token().map(str::to_string);
        if token.is_none() {
            return;
        }
    }
}

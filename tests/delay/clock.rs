//! The longest delay, 40 days, seen through the forwarding gateway's moved delay clock.

use super::*;
use crate::hostile::{unique, OPEN_AUTH};

const FORTY_DAYS_MS: i64 = 40 * 86_400_000;

/// `$delayed/3456000/<t>` (40 days) is accepted and not delivered while the clock stands;
/// moved forward to 2 s before it is due, it arrives about 2 s later (no earlier than due and
/// at most 1 s after, in the moved clock), once. `$delayed/3456001/<t>` is refused with 0x90
/// and never delivered, even 40 days on.
pub async fn forty_days_through_the_moved_clock_and_one_second_more_is_refused(core: &Core) {
    let _turn = serial().await;
    let gw = core.start(&isolated(&format!("{OPEN_AUTH}{DELAY}"))).await;
    wait_forwarding(&gw).await;
    let topic = format!("{}/forty", unique("delayclock"));
    let sub = Collector::start(gw.addr(), &unique("clock-sub"), true, 0, &[&topic]).await;

    let sent = now_ms();
    let (code, acked) = publish_one(gw.addr(), &format!("$delayed/3456000/{topic}"), "forty-days", false, &[]).await;
    assert_eq!(code, 0, "PUBACK of a 40-day delay");
    let (code, _) = publish_one(gw.addr(), &format!("$delayed/3456001/{topic}"), "one-second-more", false, &[]).await;
    assert_eq!(code, 0x90, "PUBACK of 40 days and 1 s");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sub.count(), 0, "delivered before the clock moved: {:?}", sub.got());

    // Due 2 s from now in the moved clock: the gateway's due time is between `sent` and
    // `acked` plus 40 days.
    let before = now_ms();
    gw.ctx.delay.clock.advance(FORTY_DAYS_MS - 2000 - (before - acked));
    let got = sub.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "not delivered within 10 s of the moved clock's due time");
    let took = got[0].at_ms - before;
    assert_eq!(got[0].payload, "forty-days");
    assert!(took >= 2000 - (acked - sent), "delivered {took} ms after the clock moved to 2 s before due");
    assert!(took <= 3000, "delivered {took} ms after the clock moved to 2 s before due");

    // Once; and the refused one never.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let payloads: Vec<String> = sub.got().into_iter().map(|g| g.payload).collect();
    assert_eq!(payloads, vec!["forty-days".to_string()]);
    drop(gw);
}

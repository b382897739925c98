//! The Lua scripts that keep the shared state: each runs atomically on the
//! Redis server, on its clock (`TIME`), so replicas' clocks never matter.
//!
//! Per upstream, three sorted sets under the cluster's hash tag (one slot,
//! so Redis Cluster runs them too):
//! - `leases`: one member per request holding a slot, scored by its expiry;
//! - `waiters`: one member per request waiting for a slot, scored by its
//!   priority; a member starts with its arrival (zero-padded milliseconds
//!   of the server's clock), so equal priorities sort by arrival;
//! - `waiting`: the same members, scored by their expiry.
//!
//! And `done`, a count of the upstream's completions (its drain rate).
//! Per key: `rpm:<key>` and `tpm:<key>`, GCRA's theoretical arrival time,
//! expiring when the bucket is full again. And one for the cluster:
//! `replicas`, each replica scored by its expiry.
//! Expired members are swept by every script that reads the sets, so a
//! replica that dies gives back its slots and its places after a lease time.

/// GCRA (as governor does it locally: bursts up to a minute's units, then
/// one every minute ÷ the limit) for `KEYS[k]`'s key, holding its
/// theoretical arrival time in milliseconds of the server's clock. `take`
/// is `n` units of a limit of `per` a minute (cut to a minute's); `n <= 0`
/// gives back. Returns the new arrival time, or `nil` and the milliseconds
/// until the charge would pass; `force` charges a debt whatever the bucket
/// holds (at most a minute of it beyond empty). `put` stores the new time.
const GCRA: &str = r#"
local function take(key, per, n, now, force)
  local interval = 60000 / per
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  if n > per then n = per end
  local new = tat + n * interval
  if new < now then new = now end
  if force then
    if new > now + 120000 then new = now + 120000 end
    return new, 0
  end
  if n > 0 and now < new - 60000 then
    return nil, math.ceil(new - 60000 - now)
  end
  return new, 0
end
local function put(key, tat, now)
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
end
"#;

/// The server's clock in milliseconds, as `now`.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Ask for a slot: `KEYS` leases, waiters, waiting, the key's request
/// rate, the key's token rate; `ARGV` limit, lease ms, member (`""` the
/// first time), priority, a unique suffix for a new member, the key's
/// requests per minute (`0`: none), its tokens per minute (`0`: none), the
/// tokens to charge (an estimate plus corrections due; `<= 0` gives back).
/// When asked to, the key's rates are checked and both charged, or
/// neither (GCRA, see [`GCRA`]): over its requests per minute
/// `{-1, ms until it would pass, 0}`, over its tokens `{-2, ms, 0}`.
/// Then registers (or keeps) the member among the waiters and grants it a
/// slot when fewer than `limit` are held and fewer waiters than the free
/// slots are more urgent or came earlier at its priority. Returns
/// `{granted, member, held}`.
pub(super) fn acquire() -> String {
    [GCRA, NOW, ACQUIRE].concat()
}

const ACQUIRE: &str = r#"
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local rpm = tonumber(ARGV[6])
local tpm = tonumber(ARGV[7])
local rtat, ttat
if rpm > 0 then
  local wait
  rtat, wait = take(KEYS[4], rpm, 1, now, false)
  if not rtat then return {-1, tostring(wait), 0} end
end
if tpm > 0 then
  local wait
  ttat, wait = take(KEYS[5], tpm, tonumber(ARGV[8]), now, false)
  if not ttat then return {-2, tostring(wait), 0} end
end
if rtat then put(KEYS[4], rtat, now) end
if ttat then put(KEYS[5], ttat, now) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, m in ipairs(gone) do redis.call('ZREM', KEYS[2], m) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local member = ARGV[3]
if member == '' then member = string.format('%016d', now) .. ':' .. ARGV[5] end
if redis.call('ZSCORE', KEYS[1], member) then
  return {1, member, redis.call('ZCARD', KEYS[1])}
end
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), member)
redis.call('ZADD', KEYS[3], now + lease, member)
local held = redis.call('ZCARD', KEYS[1])
local free = limit - held
if free > 0 and redis.call('ZRANK', KEYS[2], member) < free then
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZADD', KEYS[1], now + lease, member)
  return {1, member, held + 1}
end
return {0, member, held}
"#;

/// Corrections of keys' token charges, from one replica's heartbeat:
/// `KEYS` the keys' token rates; `ARGV` for each, its tokens per minute
/// and the tokens owed (a debt is charged whatever the bucket holds, a
/// credit gives back).
pub(super) fn adjust() -> String {
    [GCRA, NOW, ADJUST].concat()
}

const ADJUST: &str = r#"
for i, key in ipairs(KEYS) do
  local per = tonumber(ARGV[2 * i - 1])
  local n = tonumber(ARGV[2 * i])
  local tat = take(key, per, n, now, n > 0)
  put(key, tat, now)
end
return #KEYS
"#;

/// Give a slot back, or a place up: `KEYS` leases, waiters, waiting, the
/// upstream's count of completions; `ARGV` member, channel, message. A
/// slot given back is counted and announced on the channel, so waiting
/// replicas ask again at once.
pub(super) const RELEASE: &str = r#"
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if held == 1 then
  redis.call('INCR', KEYS[4])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return held
"#;

/// The heartbeat of one replica for one upstream: `KEYS` leases, waiting,
/// replicas, the upstream's count of completions; `ARGV` lease ms, replica
/// id, then the members it holds or waits with. Extends each that still
/// exists (never one that expired: its slot may be another's now) and the
/// replica's own entry. Returns `{replicas alive, members lost, slots held
/// in all, completions so far, the server's clock in ms}`.
pub(super) fn renew() -> String {
    [NOW, RENEW].concat()
}

const RENEW: &str = r#"
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local lost = 0
for i = 3, #ARGV do
  local m = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], m) then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, m)
  elseif redis.call('ZSCORE', KEYS[2], m) then
    redis.call('ZADD', KEYS[2], 'XX', now + lease, m)
  else
    lost = lost + 1
  end
end
redis.call('ZADD', KEYS[3], now + lease, ARGV[2])
return {redis.call('ZCARD', KEYS[3]), lost, redis.call('ZCARD', KEYS[1]),
  tonumber(redis.call('GET', KEYS[4]) or '0'), now}
"#;

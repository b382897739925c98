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
//! And one for the cluster: `replicas`, each replica scored by its expiry.
//! Expired members are swept by every script that reads the sets, so a
//! replica that dies gives back its slots and its places after a lease time.

/// Ask for a slot: `KEYS` leases, waiters, waiting, the key's request
/// rate; `ARGV` limit, lease ms, member (`""` the first time), priority,
/// a unique suffix for a new member, the key's requests per minute (`0`:
/// none). The first time, the key's rate is checked and charged (GCRA, as
/// governor does it locally: bursts up to a minute's requests, then one
/// every minute ÷ the limit); over it, `{-1, ms until it would pass, 0}`.
/// Then registers (or keeps) the member among the waiters and grants it a
/// slot when fewer than `limit` are held and fewer waiters than the free
/// slots are more urgent or came earlier at its priority. Returns
/// `{granted, member, held}`.
pub(super) const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local rpm = tonumber(ARGV[6])
if ARGV[3] == '' and rpm > 0 then
  local interval = 60000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[4]) or now)
  if tat < now then tat = now end
  local allow_at = tat + interval - 60000
  if now < allow_at then
    return {-1, tostring(math.ceil(allow_at - now)), 0}
  end
  redis.call('SET', KEYS[4], tostring(tat + interval), 'PX', math.ceil(tat + interval - now) + 1)
end
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

/// Give a slot back, or a place up: `KEYS` leases, waiters, waiting;
/// `ARGV` member, channel, message. A slot given back is announced on the
/// channel, so waiting replicas ask again at once.
pub(super) const RELEASE: &str = r#"
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if held == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return held
"#;

/// The heartbeat of one replica for one upstream: `KEYS` leases, waiting,
/// replicas; `ARGV` lease ms, replica id, then the members it holds or
/// waits with. Extends each that still exists (never one that expired:
/// its slot may be another's now) and the replica's own entry. Returns
/// `{replicas alive, members lost, slots held in all}`.
pub(super) const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
return {redis.call('ZCARD', KEYS[3]), lost, redis.call('ZCARD', KEYS[1])}
"#;

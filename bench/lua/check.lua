-- The benchmark's OpenResty reference (bench/gate.py): the API-key check that OpenResty and
-- Kong users write in nginx itself instead of asking a sidecar.  In access_by_lua: take the
-- key from Authorization, SHA-256 it, GET its record from Redis over a pooled cosocket; no
-- record is a 401, a record lets the request through to the upstream with the account id.
-- Only a reference: it checks no scope, no rate limit and no expiry, and counts nothing.
--
--   lua_package_path "/path/to/bench/lua/?.lua;;";
--   init_by_lua_block { require("check").configure({ redis = "unix:/path/redis.sock", ... }) }
--   location /api/ { access_by_lua_block { require("check").access() } proxy_pass ...; }

-- OpenResty's names; Debian's lua-nginx-redis and lua-nginx-string install them as nginx.*.
local function need(name)
  local ok, found = pcall(require, "resty." .. name)
  if ok then
    return found
  end
  return require("nginx." .. name)
end

local redis = need "redis"
local sha256 = need "sha256"
local resty_string = need "string"
local cjson = require "cjson.safe"

local _M = {}

local UNAUTHORIZED = '{"error":{"code":"unauthorized","message":"Missing or invalid API key"}}'
local UNAVAILABLE = '{"error":{"code":"internal","message":"Rate limit service unavailable"}}'
-- A Wacrm key: the prefix, then 43 base64url characters.
local KEY_PREFIX = "wacrm_live_"
local KEY_LENGTH = #KEY_PREFIX + 43

local conf = {
  redis = "unix:/run/redis/redis.sock",  -- "unix:/path", or "host:port"
  record_head = "wacrm:key:{",           -- the record's Redis key, around the key's hash
  record_tail = "}",
  account_field = "a",                   -- the record's JSON names of the ids
  key_field = "k",
  timeout_ms = 500,
  pool_size = 64,
  idle_ms = 60000,
}

-- Replace the defaults above with the fields of *options*; call from init_by_lua.
function _M.configure(options)
  for name, value in pairs(options) do
    conf[name] = value
  end
end

local function refuse(status, body, extra)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  for name, value in pairs(extra) do
    ngx.header[name] = value
  end
  ngx.print(body)
  return ngx.exit(status)
end

local function connect(red)
  if conf.redis:sub(1, 5) == "unix:" then
    return red:connect(conf.redis)
  end
  local host, port = conf.redis:match("^(.+):(%d+)$")
  return red:connect(host, tonumber(port))
end

-- The access check of one request.
function _M.access()
  local header = ngx.var.http_authorization
  if header == nil then
    return refuse(401, UNAUTHORIZED, { ["WWW-Authenticate"] = 'Bearer realm="wacrm"' })
  end
  local key = header:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +(%S+)$") or header
  if #key ~= KEY_LENGTH or key:sub(1, #KEY_PREFIX) ~= KEY_PREFIX then
    return refuse(401, UNAUTHORIZED, {
      ["WWW-Authenticate"] = 'Bearer realm="wacrm", error="invalid_token"' })
  end

  local digest = sha256:new()
  digest:update(key)
  local hash = resty_string.to_hex(digest:final())

  local red = redis:new()
  red:set_timeout(conf.timeout_ms)  -- connect, send and read (resty.redis 0.27 has no set_timeouts)
  local ok, err = connect(red)
  if not ok then
    ngx.log(ngx.ERR, "redis: cannot connect: ", err)
    return refuse(503, UNAVAILABLE, { ["Retry-After"] = "1" })
  end
  local record
  record, err = red:get(conf.record_head .. hash .. conf.record_tail)
  if record == nil then  -- an error: the connection is not given back to the pool
    red:close()
    ngx.log(ngx.ERR, "redis: GET failed: ", err)
    return refuse(503, UNAVAILABLE, { ["Retry-After"] = "1" })
  end
  red:set_keepalive(conf.idle_ms, conf.pool_size)

  if record == ngx.null then
    return refuse(401, UNAUTHORIZED, {
      ["WWW-Authenticate"] = 'Bearer realm="wacrm", error="invalid_token"' })
  end
  local fields = cjson.decode(record)
  if type(fields) ~= "table" then
    ngx.log(ngx.ERR, "a key record that is not JSON")
    return refuse(503, UNAVAILABLE, { ["Retry-After"] = "1" })
  end
  ngx.var.wacrm_account_id = fields[conf.account_field]
  ngx.var.wacrm_key_id = fields[conf.key_field]
end

return _M

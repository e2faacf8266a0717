-- wrk script for bench/scale.sh: every request asks for a narinfo picked at random from a
-- file of fixed-width 32-byte store hashes (no separators; `ncps-scale list` writes one).
--   wrk ... -s bench/wrk-list.lua http://HOST:PORT -- LISTFILE
-- The hot case uses the same script with a one-hash file, so wrk's own Lua cost is the
-- same on both sides of the ratio.
local list, n
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  list = f:read("*a")
  f:close()
  n = math.floor(#list / 32)
  assert(n > 0, "empty list " .. args[1])
  math.randomseed(os.time() + 7919 * (thread_no or 0))
end

function request()
  local k = math.random(0, n - 1) * 32
  return wrk.format("GET", "/" .. list:sub(k + 1, k + 32) .. ".narinfo")
end

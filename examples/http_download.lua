-- Downloads a file with a progress line while a timer keeps ticking: nothing waits for the
-- network but the coroutine that asked.
--   luna-host examples/http_download.lua [url [file]]
-- Without a URL it serves 8 MiB itself on a free port, 256 KiB every 20 ms, and downloads that.
local luna = require("luna")
local url, file = ...
local server
if not url then
  local piece = ("0123456789abcdef"):rep(16384)
  server = luna.new_http_app({ name = "files" })
  server:get("/blob.bin", function(req, res)
    res:send_status(200)
    res:send_header("Content-Length", #piece * 32)
    for _ = 1, 32 do
      res:send_data(piece)
      luna.sleep(0.02)
    end
    res:finish()
  end)
  server:listen(0, "127.0.0.1")
  url = "http://127.0.0.1:" .. server.server.port .. "/blob.bin"
end
file = file or os.tmpname()

local ticks = 0
local ticker = luna.set_interval(0.01, function() ticks = ticks + 1 end)

luna.spawn(function()
  local shown = -1
  local response, err = luna.http.request({
    url = url,
    save_to = file,
    on_progress = function(received, total)
      local percent = total and math.floor(received * 100 / total) or -1
      if percent ~= shown then
        shown = percent
        io.write(("\r%s: %d KiB%s"):format(url, math.floor(received / 1024),
          total and (" of %d KiB (%d%%)"):format(math.floor(total / 1024), percent) or ""))
      end
    end,
  })
  io.write("\n")
  if response then
    print(("saved %s: status %d, %.3f s, the timer ticked %d times meanwhile"):format(
      file, response.status_code, response.timings.total, ticks))
  else
    print("download failed: " .. err)
  end
  ticker:cancel()
  if server then
    server:stop()
    os.remove(file)
  end
  luna.close()
end)

-- Headless LÖVE: no window, graphics or audio; love.update still runs every frame.
function love.conf(t)
  t.window = nil
  t.modules.window = false
  t.modules.graphics = false
  t.modules.audio = false
  t.modules.sound = false
  t.modules.joystick = false
  t.modules.video = false
  t.modules.font = false
  t.modules.image = false
end
